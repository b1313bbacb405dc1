package main

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

// TestDetachStopRestart: --detach returns once the emulator answers on
// the port asked for; --stop ends it and its process; started again on
// the same location and port it has the same containers (its data was
// saved on the way out); a port already taken is refused, saying so.
func TestDetachStopRestart(t *testing.T) {
	if _, err := azurite.Binary(); errors.Is(err, azurite.ErrNotInstalled) {
		testenv.Missing(t, "Azurite ("+err.Error()+")", azurite.InstallHint)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "azurite-run")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	loc := filepath.Join(dir, "az")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	run := func(args ...string) (string, error) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	stop := func() {
		if out, err := run("--stop", "--location", loc); err != nil || !strings.Contains(out, "stopped Azurite") {
			t.Fatalf("--stop: %v\n%s", err, out)
		}
	}
	out, err := run("--location", loc, "--port", port, "--detach")
	endpoint := "http://127.0.0.1:" + port + "/" + azurite.DevAccount
	if err != nil || !strings.Contains(out, "Azurite answers at "+endpoint) || !strings.Contains(out, "--stop --location "+loc) {
		t.Fatalf("--detach: %v\n%s", err, out)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_, _ = run("--stop", "--location", loc)
		}
	})
	b, err := os.ReadFile(filepath.Join(loc, pidFile))
	if err != nil {
		t.Fatal(err)
	}
	pid := strings.TrimSpace(string(b))
	cc := containerAt(t, endpoint+"/kept")
	if _, err := cc.Create(context.Background(), nil); err != nil {
		t.Fatalf("create a container: %v", err)
	}
	// Azurite saves its metadata (LokiJS) in the background and again when
	// it closes; a save already under way when it closes can leave the
	// newest change out (seen once in make test). What the restart must
	// keep is what Azurite has saved: wait for the container to be in its
	// database file.
	db := filepath.Join(loc, "__azurite_db_blob__.json")
	for deadline := time.Now().Add(30 * time.Second); ; {
		if b, err := os.ReadFile(db); err == nil && strings.Contains(string(b), `"kept"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Azurite has not saved the container in %s within 30 s", db)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A second one on the same location is refused.
	if out, err := run("--location", loc, "--port", "0", "--detach"); err == nil || !strings.Contains(out, "already serves") {
		t.Errorf("a second --detach on the same location: %v\n%s", err, out)
	}
	stop()
	if _, err := os.Stat("/proc/" + pid); err == nil {
		if cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline"); len(cmd) > 0 {
			t.Errorf("azurite-run pid %s still runs after --stop", pid)
		}
	}
	if c, err := net.Dial("tcp", "127.0.0.1:"+port); err == nil {
		c.Close()
		t.Error("the port still answers after --stop")
	}

	out, err = run("--location", loc, "--port", port, "--detach")
	if err != nil {
		t.Fatalf("--detach again: %v\n%s", err, out)
	}
	if _, err := containerAt(t, endpoint+"/kept").GetProperties(context.Background(), nil); err != nil {
		t.Errorf("the container made before the restart is gone: %v", err)
	}
	// The port is taken now: another location on it is refused at once.
	out, err = run("--location", filepath.Join(dir, "other"), "--port", port, "--detach")
	if err == nil || !strings.Contains(out, "port "+port+" on 127.0.0.1 is taken") || !strings.Contains(out, "--port") {
		t.Errorf("a taken port: %v\n%s", err, out)
	}
	stop()
	stopped = true
}

func containerAt(t *testing.T, url string) *container.Client {
	t.Helper()
	cred, err := container.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := container.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
