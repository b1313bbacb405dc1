// Command azurite-throttle puts Azure's per-blob limits in front of a
// running Azurite: a reverse proxy that answers 503 ServerBusy once a blob
// gets more requests or bytes per second than allowed, so benchmarks see the
// throttling real Azure does. It writes its endpoint (in the target's form)
// to a file once listening, and its counters as JSON when it stops on
// SIGINT/SIGTERM. It is a development tool, not part of the vhdsync binary.
//
//	azurite-run --port 0 --location DIR --endpoint-file az.url &
//	azurite-throttle --target "$(cat az.url)" --endpoint-file proxy.url --stats-file stats.json &
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
)

func main() {
	std := throttle.StandardPageBlob()
	target := flag.String("target", "", "Azurite's blob endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 (required)")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	endpointFile := flag.String("endpoint-file", "", "write the proxy's endpoint URL here once listening")
	rps := flag.Float64("rps", std.RequestsPerSecond, "requests per second per blob (0: unlimited)")
	mibps := flag.Float64("mibps", std.BytesPerSecond/(1<<20), "MiB per second per blob, ingress and egress together (0: unlimited)")
	timeoutFraction := flag.Float64("timeout-fraction", 0, "share of refusals answered 500 OperationTimedOut instead of 503 ServerBusy")
	wireLog := flag.String("wire-log", "", "append one JSON line per request to this file")
	statsFile := flag.String("stats-file", "", "write the counters as JSON here on exit")
	delay := flag.Duration("delay", 0, "added to every request's round trip (e.g. 20ms: a remote region)")
	flag.Parse()
	if *target == "" {
		fmt.Fprintln(os.Stderr, "azurite-throttle: --target is required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	lim := throttle.Limits{RequestsPerSecond: *rps, BytesPerSecond: *mibps * (1 << 20), TimeoutFraction: *timeoutFraction}
	err := run(ctx, *target, *listen, *endpointFile, *wireLog, *statsFile, lim, throttle.WithDelay(*delay))
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "azurite-throttle: %v\n", err)
		os.Exit(1)
	}
}

// run serves the proxy until ctx ends, then writes the stats file.
func run(ctx context.Context, target, listen, endpointFile, wireLog, statsFile string, lim throttle.Limits, opts ...throttle.Option) error {
	if wireLog != "" {
		f, err := os.OpenFile(wireLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		opts = append(opts, throttle.WithWireLog(f))
	}
	p, err := throttle.New(target, lim, opts...)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: p, ReadHeaderTimeout: 30 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	endpoint := p.Endpoint(ln.Addr().String())
	if endpointFile != "" {
		// Written whole under another name and renamed, so a script
		// polling for the file never reads half a URL.
		tmp := endpointFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(endpoint+"\n"), 0o600); err == nil {
			err = os.Rename(tmp, endpointFile)
		}
		if err != nil {
			_ = srv.Close()
			return err
		}
	}
	fmt.Println(endpoint)

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	// Let answers in flight finish, so the counters include them.
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	p.CloseIdleConnections()
	if statsFile != "" {
		b, err := json.MarshalIndent(p.Stats(), "", "  ")
		if err != nil {
			return err
		}
		tmp := statsFile + ".tmp"
		if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
			return err
		}
		return os.Rename(tmp, statsFile)
	}
	return nil
}
