package pageblob

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// closedPort is a loopback port nothing listens on (connection refused).
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestUnreachableFailsFast: a client that never had an answer does not
// retry a refused connection (the SDK's backoff made a first command wait
// 9 s), and says what could not be reached and what to check; the error
// stays transient for the replication core, which retries it itself.
func TestUnreachableFailsFast(t *testing.T) {
	addr := closedPort(t)
	c, err := Open("http://"+addr+"/devstoreaccount1/disks/d.vhd", &Options{Env: noEnv, MaxRetries: 3})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = c.Properties(context.Background())
	took := time.Since(start)
	if !errors.Is(err, ErrUnreachable) || took > time.Second {
		t.Fatalf("Properties on a closed port: %v after %v; want ErrUnreachable at once", err, took)
	}
	for _, want := range []string{"could not reach " + addr, "connection refused", "is running"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q: %v", want, err)
		}
	}
	if !remote.IsTransient(err) {
		t.Errorf("an unreachable endpoint is not transient for the flusher: %v", err)
	}
	// A write fails the same way, still transient.
	if err := c.PutPagesCond(context.Background(), 0, make([]byte, 512), "", nil); !errors.Is(err, ErrUnreachable) || !remote.IsTransient(err) {
		t.Errorf("put page on a closed port: %v", err)
	}
	// A host name that does not resolve.
	c, err = Open("https://vhdsync-no-such-account.invalid/disks/d.vhd", &Options{Env: func(k string) string {
		if k == "AZURE_STORAGE_KEY" {
			return DevKey
		}
		return ""
	}, MaxRetries: 3})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if _, err := c.Properties(context.Background()); !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "resolve") || time.Since(start) > 5*time.Second {
		t.Errorf("Properties of an unknown host: %v after %v", err, time.Since(start))
	}
}

// TestUnrecognisedAccount: a plain-http URL that no credential source
// signs (a typo in the emulator's account) is refused at Open, naming the
// account and the sources tried, instead of falling through to Entra ID.
func TestUnrecognisedAccount(t *testing.T) {
	_, err := Open("http://127.0.0.1:10000/devstoreacount1/disks/d.vhd", &Options{Env: noEnv})
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("Open: %v, want ErrAuth", err)
	}
	for _, want := range []string{`account "devstoreacount1"`, "not recognised", "a SAS in the URL", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "devstoreaccount1", "Entra ID"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q: %v", want, err)
		}
	}
	// The same URL with a key is fine: only the fall-through is refused.
	if _, err := Open("http://127.0.0.1:10000/devstoreacount1/disks/d.vhd", &Options{Env: func(k string) string {
		if k == "AZURE_STORAGE_KEY" {
			return DevKey
		}
		return ""
	}}); err != nil {
		t.Errorf("with AZURE_STORAGE_KEY: %v", err)
	}
}

// TestCopySourceURL: a copy names its source with the snapshot it reads
// and the source's SAS; a source in another account without a SAS is
// refused (the service could not read it).
func TestCopySourceURL(t *testing.T) {
	src, err := Open("https://acct.blob.core.windows.net/disks/a.vhd?sv=2022-11-02&sr=b&sp=r&sig=S1G", &Options{Env: noEnv})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := src.AtSnapshot("2026-11-24T15:20:00.1234567Z")
	if err != nil {
		t.Fatal(err)
	}
	dst, err := Open("https://other.blob.core.windows.net/disks/b.vhd?sv=2022-11-02&sr=b&sp=cw&sig=D1G", &Options{Env: noEnv})
	if err != nil {
		t.Fatal(err)
	}
	u, err := dst.copySourceURL(snap)
	if err != nil || u != "https://acct.blob.core.windows.net/disks/a.vhd?snapshot=2026-11-24T15%3A20%3A00.1234567Z&sv=2022-11-02&sr=b&sp=r&sig=S1G" {
		t.Errorf("copy source: %q, %v", u, err)
	}
	keyed := func(k string) string {
		if k == "AZURE_STORAGE_KEY" {
			return DevKey
		}
		return ""
	}
	src2, _ := Open("https://acct.blob.core.windows.net/disks/a.vhd", &Options{Env: keyed})
	if _, err := dst.copySourceURL(src2); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "SAS") {
		t.Errorf("a keyed source in another account: %v, want ErrAuth asking for a SAS", err)
	}
	same, _ := Open("https://acct.blob.core.windows.net/disks/c.vhd", &Options{Env: keyed})
	if u, err := same.copySourceURL(src2); err != nil || u != "https://acct.blob.core.windows.net/disks/a.vhd" {
		t.Errorf("same account: %q, %v", u, err)
	}
}
