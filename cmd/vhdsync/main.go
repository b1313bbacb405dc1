// Command vhdsync keeps a virtual fixed-format VHD disk replicated, live, to
// an Azure page blob. See README.md for the walk-through; `vhdsync help`
// lists the commands.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// globals are the flags every command shares.
type globals struct {
	logLevel string
	logJSON  bool
	stdout   io.Writer
	stderr   io.Writer
	env      func(string) string
}

func (g *globals) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lvl}
	if g.logJSON {
		return slog.New(slog.NewJSONHandler(g.stderr, opts))
	}
	return slog.New(slog.NewTextHandler(g.stderr, opts))
}

func newRootCmd(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "vhdsync",
		Short: "Keep a virtual fixed VHD disk replicated, live, to an Azure page blob",
		Long: `vhdsync exposes a virtual fixed-format VHD disk through FUSE. Every write
is journaled locally and replicated in order to an Azure page blob with Put
Page / Clear Pages, so the blob is a crash-consistent replica of the disk
(whenever its sequence number is even). To run it in Azure, make a managed
disk from the blob (az disk create --source BLOB-URL) once it is unmounted,
or from a copy of a recovery point or of the live disk that
` + "`vhdsync points promote`" + ` makes; Azure no longer attaches page blobs to VMs.

Blob URLs look like https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB.vhd
(or http://127.0.0.1:PORT/devstoreaccount1/CONTAINER/BLOB.vhd for Azurite).
Credentials, first match wins: a SAS in the URL; AZURE_STORAGE_CONNECTION_STRING;
AZURE_STORAGE_KEY (account from the URL); the emulator's development account
for an Azurite URL; Entra ID (az login, managed identity, AZURE_CLIENT_* vars).`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(g.stdout)
	root.SetErr(g.stderr)
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.PersistentFlags().BoolVar(&g.logJSON, "log-json", false, "write logs as JSON lines instead of text")
	root.AddCommand(newCreateCmd(g), newInspectCmd(g), newMountCmd(g), newUnmountCmd(g), newStatusCmd(g), newReplayCmd(g), newResyncCmd(g), newVerifyCmd(g), newImportCmd(g), newDownloadCmd(g), newApplyCmd(g), newPointsCmd(g))
	root.AddCommand(newSetBlobCmd(g), newResizeCmd(g))
	return root
}

func main() {
	args, done, err := mountHelperArgs(os.Args[0], os.Args[1:], os.Setenv) // mount(8)'s forms (mounthelper.go)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vhdsync: %s\n", err)
		os.Exit(exitCode(err))
	}
	if done {
		os.Exit(ExitOK)
	}
	privateFiles(args)
	os.Exit(run(args, os.Stdout, os.Stderr, os.Getenv))
}

// privateFiles sets the umask to 077 for every command but download (whose
// output file follows the user's umask), so that whatever vhdsync or its
// libraries create is private to the user: badger creates its journal
// files 0644 itself, and they hold the disk's data. Only the real binary
// does this (the umask is process-wide; the in-process tests keep theirs).
func privateFiles(args []string) {
	c, _, err := newRootCmd(&globals{stdout: io.Discard, stderr: io.Discard, env: os.Getenv}).Find(args)
	if err == nil && c.Name() == "download" {
		return
	}
	syscall.Umask(0o077)
}

// run executes one vhdsync command line and returns its exit code.
func run(args []string, stdout, stderr io.Writer, env func(string) string) int {
	env, cerr := withCredentials(env)
	if cerr != nil {
		fmt.Fprintf(stderr, "vhdsync: %s\n", cerr)
		return ExitAuth
	}
	g := &globals{stdout: stdout, stderr: stderr, env: env}
	root := newRootCmd(g)
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := root.ExecuteContext(ctx)
	if err == nil {
		return ExitOK
	}
	code := exitCode(err)
	msg := err.Error()
	// One hint is enough: a message that already says what to run or see
	// gets no "(see --help)" after it.
	if code == ExitUsage && !strings.Contains(msg, "--help") && !strings.Contains(msg, "(see ") && !strings.Contains(msg, "`") {
		msg += " (see --help)"
	}
	fmt.Fprintf(stderr, "vhdsync: %s\n", msg)
	return code
}
