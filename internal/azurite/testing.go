package azurite

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/vhdsync/vhdsync/internal/testenv"
)

// Start launches a fresh Azurite (strict unless opts say Loose) for the
// test in a temporary directory and stops it in t.Cleanup. Without Azurite
// it skips the test, or fails it when CI=true, naming the command that
// installs it.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	if _, err := Binary(); errors.Is(err, ErrNotInstalled) {
		testenv.Missing(t, "Azurite ("+err.Error()+")", InstallHint)
	}
	dir := t.TempDir()
	s, err := Launch(context.Background(), dir, filepath.Join(dir, "azurite.log"), opts...)
	if err != nil {
		t.Fatalf("start azurite: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}
