// Command azurite-run starts the project's pinned Azurite blob emulator on
// 127.0.0.1, port 10000 by default (Azurite's own; --port 0 picks a free
// one, as the demo and the benchmarks do), and stops it on SIGINT/SIGTERM.
// With --detach it returns once the emulator answers and keeps running in
// the background until `azurite-run --stop --location DIR`. It is a
// development tool, not part of the vhdsync binary.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
)

// pidFile, in the emulator's data directory, names the azurite-run that
// serves it, for --stop.
const pidFile = "azurite-run.pid"

// readyFDEnv names the descriptor on which a detached azurite-run tells
// the one that started it that the emulator answers (or why not).
const readyFDEnv = "AZURITE_RUN_READY_FD"

func main() {
	location := flag.String("location", "", "directory for Azurite's data (required); the blobs stay there when it stops")
	port := flag.Int("port", azurite.DefaultPort, "TCP port on 127.0.0.1 (0: a free one)")
	endpointFile := flag.String("endpoint-file", "", "write the blob endpoint URL here once Azurite answers")
	logFile := flag.String("log", "", "Azurite's log file (default: none; with --detach: DIR/azurite.log)")
	detach := flag.Bool("detach", false, "return once Azurite answers, leaving it running in the background (stop it with --stop)")
	stop := flag.Bool("stop", false, "stop the detached azurite-run serving --location, and wait until it is gone")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `usage: azurite-run --location DIR [--port N] [--detach] [--endpoint-file F] [--log F]
       azurite-run --stop --location DIR

Starts the pinned Azurite (tools/azurite, installed by make deps) at
http://127.0.0.1:PORT/devstoreaccount1 with its data in DIR. In the
foreground it runs until Ctrl-C or SIGTERM; with --detach it returns once
the emulator answers, and --stop --location DIR ends it. Started again on
the same DIR and port, it serves the same blobs.

`)
		flag.PrintDefaults()
	}
	flag.Parse()
	if *location == "" {
		fmt.Fprintln(os.Stderr, "azurite-run: --location is required (see -help)")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*location)
	if err != nil {
		fail(err)
	}
	switch {
	case *stop:
		if err := stopDetached(abs); err != nil {
			fail(err)
		}
	case *detach:
		if err := startDetached(abs, *port, *endpointFile, *logFile); err != nil {
			fail(err)
		}
	default:
		serve(abs, *port, *endpointFile, *logFile)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "azurite-run: %v\n", err)
	os.Exit(1)
}

// serve runs Azurite in the foreground until a signal.
func serve(location string, port int, endpointFile, logFile string) {
	var ready *os.File
	if fd := os.Getenv(readyFDEnv); fd != "" {
		n, _ := strconv.Atoi(fd)
		ready = os.NewFile(uintptr(n), "ready")
	}
	report := func(err error) {
		if ready != nil {
			if err != nil {
				fmt.Fprintf(ready, "ERR %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
			}
			ready.Close()
			ready = nil
		}
		if err != nil {
			fail(err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(location, 0o700); err != nil {
		report(err)
	}
	s, err := azurite.LaunchOn(ctx, port, location, logFile)
	if err != nil {
		report(err)
	}
	// On the way out Azurite saves its metadata, so that the blobs are
	// there when it is started again on the same location.
	defer func() {
		if err := s.Shutdown(30 * time.Second); err != nil {
			fmt.Fprintf(os.Stderr, "azurite-run: %v\n", err)
		}
	}()
	if endpointFile != "" {
		tmp := endpointFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(s.Endpoint+"\n"), 0o600); err == nil {
			err = os.Rename(tmp, endpointFile)
		}
		if err != nil {
			s.Stop()
			report(err)
		}
	}
	if ready != nil {
		fmt.Fprintf(ready, "OK %s\n", s.Endpoint)
		report(nil)
	} else {
		fmt.Println(s.Endpoint)
	}
	<-ctx.Done()
}

// startDetached starts a foreground azurite-run in a session of its own,
// waits until it reports the emulator up, and records its pid in DIR.
func startDetached(location string, port int, endpointFile, logFile string) error {
	if pid, ok := runningPid(location); ok {
		return fmt.Errorf("an azurite-run (pid %d) already serves %s; stop it first with: azurite-run --stop --location %s", pid, location, location)
	}
	if err := os.MkdirAll(location, 0o700); err != nil {
		return err
	}
	if logFile == "" {
		logFile = filepath.Join(location, "azurite.log")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	args := []string{"--location", location, "--port", strconv.Itoa(port), "--log", logFile}
	if endpointFile != "" {
		args = append(args, "--endpoint-file", endpointFile)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	// Its own output goes to the log, never to this command's standard
	// output, which a caller may read to its end.
	logf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	c := exec.Command(exe, args...)
	c.Stdout, c.Stderr = logf, logf
	c.Env = append(os.Environ(), readyFDEnv+"=3")
	c.ExtraFiles = []*os.File{pw}
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return fmt.Errorf("start azurite-run: %w", err)
	}
	pw.Close()
	line, _ := bufio.NewReader(pr).ReadString('\n')
	pr.Close()
	line = strings.TrimSpace(line)
	endpoint, ok := strings.CutPrefix(line, "OK ")
	if !ok {
		_ = c.Wait()
		if msg, isErr := strings.CutPrefix(line, "ERR "); isErr {
			return errors.New(msg)
		}
		return fmt.Errorf("azurite-run exited before Azurite answered; see %s", logFile)
	}
	pid := c.Process.Pid
	_ = c.Process.Release()
	if err := os.WriteFile(filepath.Join(location, pidFile), []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		return err
	}
	fmt.Printf("Azurite answers at %s (azurite-run pid %d, data in %s, log %s); stop it with: %s --stop --location %s\n",
		endpoint, pid, location, logFile, os.Args[0], location)
	return nil
}

// runningPid is the azurite-run recorded in location, if it still runs.
func runningPid(location string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(location, pidFile))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmd), "azurite-run") {
		return 0, false // gone, or the pid was reused by another program
	}
	return pid, true
}

// stopDetached ends the detached azurite-run of location (it stops
// Azurite) and waits until it has exited.
func stopDetached(location string) error {
	pid, ok := runningPid(location)
	if !ok {
		_ = os.Remove(filepath.Join(location, pidFile))
		return fmt.Errorf("no azurite-run serves %s (no %s naming a running azurite-run)", location, pidFile)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop azurite-run pid %d: %w", pid, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, still := runningPid(location); !still {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("azurite-run pid %d did not stop within 30 s", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = os.Remove(filepath.Join(location, pidFile))
	fmt.Printf("stopped Azurite (azurite-run pid %d); its data stays in %s\n", pid, location)
	return nil
}
