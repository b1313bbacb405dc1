// Package azurite starts and stops the project's pinned Azurite blob
// emulator (tools/azurite, installed by `make deps` through `npm ci`). Tests
// use it through Start, which ties the server's life to the test; the demo
// and benchmarks use Launch directly.
//
// Azurite runs in its strict mode unless a caller asks for Loose: strict
// Azurite refuses (500 FeatureNotSupported) the headers it cannot honour,
// which the real service would act on, instead of ignoring them as --loose
// does; a client passing only in loose mode could rely on an emulator that
// silently dropped what it asked for. Only the API version check is
// skipped (--skipApiVersionCheck): the SDK speaks a newer x-ms-version than
// Azurite 3.37 knows, and the real service accepts it.
package azurite

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// DevAccount and DevKey are the emulator's well-known development account
// and key, published in Azurite's documentation; they protect nothing.
const (
	DevAccount = "devstoreaccount1"
	DevKey     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// DefaultPort is Azurite's own blob port, which azurite-run uses unless
// told otherwise.
const DefaultPort = 10000

// InstallHint is the command that installs Azurite for the tests.
const InstallHint = "make deps (runs npm ci in tools/azurite)"

// ErrNotInstalled means the pinned Azurite is not in tools/azurite/node_modules.
var ErrNotInstalled = errors.New("azurite is not installed")

// Server is a running Azurite blob service.
type Server struct {
	// Endpoint is the blob service URL, e.g. http://127.0.0.1:41234/devstoreaccount1.
	Endpoint string
	// Port is the TCP port on 127.0.0.1.
	Port int
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	// listening and closed are closed once Azurite says it listens, and
	// that it has closed (its data saved).
	listening, closed chan struct{}
}

// What Azurite prints once it listens on its port (an Azurite that could
// not bind it exits instead: EADDRINUSE), and once it has closed its
// service and saved its metadata, on SIGINT or SIGTERM.
const (
	listeningMessage = "successfully listens on"
	closedMessage    = "successfully closed"
)

// outputWatcher passes Azurite's output on to w (if set) and closes the
// channel of each message once the output has shown it.
type outputWatcher struct {
	w     io.Writer
	mu    sync.Mutex
	text  []byte // the output since the last message seen
	watch []watched
}

type watched struct {
	msg  string
	ch   chan struct{}
	seen bool
}

func newOutputWatcher(msgs ...string) *outputWatcher {
	o := &outputWatcher{}
	for _, m := range msgs {
		o.watch = append(o.watch, watched{msg: m, ch: make(chan struct{})})
	}
	return o
}

// seen returns the channel closed once msg has been printed.
func (o *outputWatcher) seen(msg string) chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, w := range o.watch {
		if w.msg == msg {
			return w.ch
		}
	}
	return nil
}

// Write implements io.Writer.
func (o *outputWatcher) Write(p []byte) (int, error) {
	o.mu.Lock()
	o.text = append(o.text, p...)
	longest := 0
	for i := range o.watch {
		w := &o.watch[i]
		longest = max(longest, len(w.msg))
		if !w.seen && bytes.Contains(o.text, []byte(w.msg)) {
			w.seen = true
			close(w.ch)
		}
	}
	if n := len(o.text); n > longest {
		o.text = append(o.text[:0], o.text[n-longest:]...)
	}
	o.mu.Unlock()
	if o.w != nil {
		return o.w.Write(p)
	}
	return len(p), nil
}

// Binary finds azurite-blob: $VHDSYNC_AZURITE if set, else
// tools/azurite/node_modules/.bin/azurite-blob in the repository that
// contains the working directory.
func Binary() (string, error) {
	if p := os.Getenv("VHDSYNC_AZURITE"); p != "" {
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find azurite: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, "tools", "azurite", "node_modules", ".bin", "azurite-blob")
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("%w at %s; install with: %s", ErrNotInstalled, p, InstallHint)
			}
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("%w: no go.mod above the working directory; install with: %s", ErrNotInstalled, InstallHint)
		}
		dir = parent
	}
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Option changes how Launch starts Azurite.
type Option func(*config)

// config is what the options set.
type config struct {
	loose bool
}

// Loose starts Azurite with --loose: it then ignores the headers and
// parameters it does not support instead of refusing them. It is for a
// test whose request the strict check refuses although the real service
// accepts it; the caller must name that check and say why it is wrong for
// Azure. No test of vhdsync needs it today; TestStrictByDefault uses it
// to show what strict mode refuses.
func Loose() Option { return func(c *config) { c.loose = true } }

// args returns Azurite's command line for port and location.
func (c config) args(port int, location string) []string {
	a := []string{"--blobHost", "127.0.0.1", "--blobPort", strconv.Itoa(port),
		"--location", location, "--silent", "--skipApiVersionCheck"}
	if c.loose {
		a = append(a, "--loose")
	}
	return a
}

// Launch starts Azurite (strict unless opts say Loose) on a free loopback
// port, storing its data in location, and returns once the service answers
// HTTP. logPath, if not empty, receives Azurite's output. Call Stop to end
// it.
func Launch(ctx context.Context, location, logPath string, opts ...Option) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	var lastErr error
	// A port can be taken between freePort and Azurite's bind; try a few.
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		s, err := launchOn(ctx, bin, port, cfg.args(port, location), logPath)
		if err == nil {
			return s, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

// LaunchOn starts Azurite (strict unless opts say Loose) on
// 127.0.0.1:port (0: a free port, as Launch) and returns once it answers.
// A port already taken is refused at once, with what to do.
func LaunchOn(ctx context.Context, port int, location, logPath string, opts ...Option) (*Server, error) {
	if port == 0 {
		return Launch(ctx, location, logPath, opts...)
	}
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return nil, fmt.Errorf("port %d on 127.0.0.1 is taken (%v): another emulator may run there (azurite-run --stop --location DIR stops a detached one); or give another --port, or --port 0 for a free one", port, err)
	}
	l.Close()
	return launchOn(ctx, bin, port, cfg.args(port, location), logPath)
}

func launchOn(ctx context.Context, bin string, port int, args []string, logPath string) (*Server, error) {
	cmd := exec.Command(bin, args...)
	// Own process group, so Stop reaches node and anything it spawned.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Azurite's output goes to the log (if any) through a watcher that
	// sees it report that it listens (waitReady: the answer then comes
	// from this Azurite, not from another that took the port first) and,
	// on the way out, that its data is saved (Shutdown).
	out := newOutputWatcher(listeningMessage, closedMessage)
	var logf *os.File
	if logPath != "" {
		f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open azurite log: %w", err)
		}
		logf, out.w = f, f
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		if logf != nil {
			logf.Close()
		}
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	s := &Server{
		Endpoint:  fmt.Sprintf("http://127.0.0.1:%d/%s", port, DevAccount),
		Port:      port,
		cmd:       cmd,
		done:      make(chan struct{}),
		listening: out.seen(listeningMessage),
		closed:    out.seen(closedMessage),
	}
	go func() {
		s.err = cmd.Wait()
		if logf != nil {
			logf.Close()
		}
		close(s.done)
	}()
	if err := s.waitReady(ctx, 60*time.Second); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// waitReady waits until this Azurite says it listens, then polls until
// it answers an HTTP request (any status: an unauthenticated request gets
// 403, which proves the service is up).
func (s *Server) waitReady(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	select {
	case <-s.listening:
	case <-s.done:
		return fmt.Errorf("azurite exited before listening on port %d (taken?): %v", s.Port, s.err)
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(limit):
		return fmt.Errorf("azurite did not listen on port %d within %v", s.Port, limit)
	}
	client := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.Endpoint+"?comp=list", nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case <-s.done:
			return fmt.Errorf("azurite exited before answering on port %d: %v", s.Port, s.err)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("azurite did not answer on port %d within %v: %w", s.Port, limit, err)
		}
	}
}

// Shutdown stops Azurite so that its data directory keeps every blob: a
// SIGINT, after which Azurite saves its metadata and says so (its process
// stays alive, see Stop), then Stop. After timeout without that message it
// is stopped all the same, and the error says so.
func (s *Server) Shutdown(timeout time.Duration) error {
	if s == nil || s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	var err error
	if serr := syscall.Kill(s.cmd.Process.Pid, syscall.SIGINT); serr == nil {
		select {
		case <-s.closed:
		case <-s.done:
		case <-time.After(timeout):
			err = fmt.Errorf("azurite did not report its data saved within %v; stopped it anyway (blobs written last may be lost)", timeout)
		}
	}
	s.Stop()
	return err
}

// Stop ends Azurite and waits for it to exit. Azurite 3.37 closes its
// listener on SIGTERM/SIGINT but its process stays alive, so it is killed
// outright: the emulator's data is scratch in every use here.
func (s *Server) Stop() {
	if s == nil || s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
}

// Pause freezes Azurite (SIGSTOP to its process group): it accepts
// connections but answers nothing, as a server that stopped responding.
// Resume lets it go on.
func (s *Server) Pause() error {
	if s == nil || s.cmd == nil || s.cmd.Process == nil {
		return fmt.Errorf("azurite is not running")
	}
	return syscall.Kill(-s.cmd.Process.Pid, syscall.SIGSTOP)
}

// Resume undoes Pause (SIGCONT); resuming a server not paused does nothing.
func (s *Server) Resume() error {
	if s == nil || s.cmd == nil || s.cmd.Process == nil {
		return fmt.Errorf("azurite is not running")
	}
	return syscall.Kill(-s.cmd.Process.Pid, syscall.SIGCONT)
}

// ContainerURL returns the URL of container name on this server.
func (s *Server) ContainerURL(name string) string { return s.Endpoint + "/" + name }

// BlobURL returns the URL of blob in container on this server.
func (s *Server) BlobURL(container, blob string) string {
	return s.Endpoint + "/" + container + "/" + blob
}
