// Command azurite-run starts the project's pinned Azurite on a free
// loopback port for the demo and the benchmarks, writes its blob endpoint to
// a file, and stops it on SIGINT/SIGTERM. It is a development tool, not part
// of the vhdsync binary.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vhdsync/vhdsync/internal/azurite"
)

func main() {
	location := flag.String("location", "", "directory for Azurite's data (required)")
	endpointFile := flag.String("endpoint-file", "", "write the blob endpoint URL here once Azurite answers")
	logFile := flag.String("log", "", "Azurite's log file (default: none)")
	flag.Parse()
	if *location == "" {
		fmt.Fprintln(os.Stderr, "azurite-run: --location is required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	s, err := azurite.Launch(ctx, *location, *logFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "azurite-run: %v\n", err)
		os.Exit(1)
	}
	defer s.Stop()
	if *endpointFile != "" {
		tmp := *endpointFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(s.Endpoint+"\n"), 0o600); err == nil {
			err = os.Rename(tmp, *endpointFile)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "azurite-run: %v\n", err)
			return
		}
	}
	fmt.Println(s.Endpoint)
	<-ctx.Done()
}
