package main

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime"
)

// servePprof serves Go's profiles on addr for the daemon's lifetime
// (mount --debug-pprof, a measurement aid): with block and mutex
// profiling on, so a write path that waits rather than computes shows
// where. The listener is bound before the mount, so a bad address fails
// the mount instead of being logged and forgotten.
func servePprof(addr string, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--debug-pprof %s: %w", addr, err)
	}
	runtime.SetBlockProfileRate(10000) // one sample per 10 µs blocked
	runtime.SetMutexProfileFraction(10)
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	log.Info("serving pprof", "addr", ln.Addr().String())
	go func() {
		// It returns only when the listener fails: the profiles are gone,
		// the mount is not affected.
		if err := http.Serve(ln, mux); err != nil {
			log.Warn("pprof server stopped", "err", err)
		}
	}()
	return nil
}
