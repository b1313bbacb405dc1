package main

import (
	"errors"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

type createFlags struct {
	blob            string
	size            string
	state           string
	name            string
	overwrite       bool
	createContainer bool
	fromBlob        string
	thin            bool
}

func newCreateCmd(g *globals) *cobra.Command {
	var f createFlags
	cmd := &cobra.Command{
		Use:   "create --blob URL --size SIZE --state DIR",
		Short: "Create a new empty fixed VHD: the page blob and the local state directory",
		Long: `Create a new, empty fixed VHD disk of SIZE bytes.

In Azure: a page blob of SIZE + 512 bytes whose last 512 bytes are a valid
fixed-VHD footer (so a managed disk can be made from the blob from the start).
Locally: the state directory DIR with the disk's description (vhdsync.json)
and a sparse local image of SIZE bytes; mount it with ` + "`vhdsync mount`" + `.

An existing blob is never touched unless --overwrite is given, and DIR must
be new or empty.

With --from-blob URL instead of --blob and --size: make the state directory
for an existing page-blob VHD (uploaded by another tool, say), downloading
its data into the local image, so it can be mounted and kept in sync.
With --thin as well, nothing is downloaded: the state directory is ready in
seconds whatever the disk's size, and the mount fetches each 4 MiB chunk
from the blob when it is first read or written, and the rest in the
background (mount --prefetch). The blob stays leased by the state directory
until every chunk is local (vhdsync status shows the progress).

` + vhdlayer.SizeHelp,
		Example: `  vhdsync create --blob https://acct.blob.core.windows.net/disks/data.vhd --size 20GiB --state /var/lib/vhdsync/data
  vhdsync create --blob http://127.0.0.1:10000/devstoreaccount1/disks/test.vhd --size 1GiB --state ./test --create-container
  vhdsync create --from-blob https://acct.blob.core.windows.net/disks/uploaded.vhd --state /var/lib/vhdsync/uploaded
  vhdsync create --from-blob https://acct.blob.core.windows.net/disks/big.vhd --state /var/lib/vhdsync/big --thin`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runCreate(cmd, g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blob, "blob", "", "page blob URL (required); a SAS may be appended as ?sv=...&sig=...")
	fl.StringVar(&f.size, "size", "", "virtual disk size, e.g. 20GiB, 512MiB, 1TiB or bytes (required); G means GiB")
	fl.StringVar(&f.state, "state", "", "local state directory to create (required; must be new or empty)")
	fl.StringVar(&f.name, "name", "", "name of the disk files in the mount (<name>.vhd, <name>.img); default: the blob name without .vhd")
	fl.BoolVar(&f.overwrite, "overwrite", false, "replace an existing blob of that name (its data is lost)")
	fl.BoolVar(&f.createContainer, "create-container", false, "create the container if it does not exist")
	_ = cmd.MarkFlagRequired("state")
	registerFromBlob(cmd, &f)
	return cmd
}

func runCreate(cmd *cobra.Command, g *globals, f createFlags) error {
	ctx := cmd.Context()
	log := g.logger()
	if f.fromBlob != "" {
		return runCreateFromBlob(ctx, g, f)
	}
	if f.size == "" {
		return usageError{errors.New(`required flag(s) "size" not set`)}
	}
	size, err := vhdlayer.ParseSize(f.size)
	if err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	if err := vhdlayer.ValidateVirtualSize(size); err != nil {
		return fmt.Errorf("--size %s: %w", f.size, err)
	}
	// Check the state directory before touching Azure, so a bad --state
	// leaves no blob behind.
	if err := statedir.CheckNew(f.state); err != nil {
		return err
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env})
	if err != nil {
		return err
	}
	loc := client.Location()
	name := f.name
	if name == "" {
		name = strings.TrimSuffix(path.Base(loc.Blob), ".vhd")
	}
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return usageError{fmt.Errorf("--name %q: a disk name must be a plain file name", name)}
	}
	footer := vhdlayer.NewFixedFooter(size, time.Now())
	raw := footer.Encode()
	log.Debug("creating page blob", "blob", loc.URL(), "virtual_size", size, "auth", client.AuthMethod())
	err = client.Create(ctx, size, raw, pageblob.CreateOptions{
		Overwrite:       f.overwrite,
		CreateContainer: f.createContainer,
		Metadata:        map[string]string{"vhdsync_disk_id": footer.UniqueID.String()},
	})
	if err != nil {
		return err
	}
	st := statedir.State{
		Name:        name,
		BlobURL:     loc.URL(),
		VirtualSize: size,
		DiskID:      footer.UniqueID.String(),
		Geometry:    footer.Geometry.String(),
		Footer:      raw[:],
		CreatedAt:   time.Now().UTC(),
	}
	st.SetBase(0) // a new blob's sequence number
	if _, err := statedir.Create(f.state, st); err != nil {
		return fmt.Errorf("the blob %s was created, but the state directory was not: %w; fix the cause and rerun with --overwrite", loc.URL(), err)
	}
	fmt.Fprintf(g.stdout, "created %s\n  virtual size %s (%d bytes), blob %d bytes, geometry %s, disk id %s\n  state directory %s (mount with: vhdsync mount --state %s MOUNTPOINT)\n",
		loc.URL(), vhdlayer.FormatSize(size), size, size+vhdlayer.FooterSize, footer.Geometry, footer.UniqueID, f.state, f.state)
	return nil
}
