package transfer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/durable"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// DefaultZeroGap is the shortest zero run that splits a range into two Put
// Page requests. A request costs about what 100 KiB of payload costs on a
// standard account (500 requests/s, ~60 MiB/s per blob), so shorter zero
// runs between data are cheaper to send than to skip.
const DefaultZeroGap = 64 << 10

// imageGap is the shortest zero run left as a hole in the local image: the
// filesystem's block.
const imageGap = 4096

// ErrBlobReplaced: the blob an interrupted import made is gone or another.
var ErrBlobReplaced = errors.New("the blob is not the one this import created")

// ImportOptions configure an import.
type ImportOptions struct {
	// Source is the disk to import: a fixed or dynamic VHD or a raw image.
	Source string
	Format Format
	// Client is the page blob to create (or, on resume, the one the
	// interrupted import created).
	Client *pageblob.Client
	// StateDir is the state directory to make: new or empty, or the one
	// an interrupted import of the same source left.
	StateDir string
	// Name of the files the mount shows; default: the blob name without .vhd.
	Name string
	// Workers is the number of windows in flight (default 8).
	Workers int
	// ZeroGap: zero runs at least this long split a range (default
	// DefaultZeroGap; at least 512).
	ZeroGap int64
	// Overwrite replaces an existing blob; CreateContainer makes a
	// missing container; BreakLease breaks another writer's lease.
	Overwrite, CreateContainer, BreakLease bool
	// SaveInterval is how often the progress is saved (default 1s).
	SaveInterval time.Duration
	Logger       *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Plan is what an import is about to do, known before any data moves.
type Plan struct {
	Kind        Kind
	SourcePath  string
	DataSize    int64
	VirtualSize int64
	Footer      vhdlayer.Footer
	BlobURL     string
	StateDir    string
	Name        string
	// Resumed: an interrupted import is continued; Runs counts the runs
	// before this one; Reset says why recorded progress was not trusted.
	Resumed bool
	Runs    int
	Reset   string
	// ScanBytes is what this run reads from the source: the allocated
	// parts of the windows not done yet; ScanTotal the whole source's.
	ScanBytes, ScanTotal int64
	// WindowsLeft and WindowsTotal count 4 MiB windows holding data.
	WindowsLeft, WindowsTotal int64
	// BlobHeld is what the blob already held when this run started.
	BlobHeld int64
}

// Rounded reports whether the disk is larger than the source's data.
func (p Plan) Rounded() bool { return p.VirtualSize != p.DataSize }

// Stats are an import's counters, read while it runs.
type Stats struct {
	Scanned  int64 // source bytes read and scanned in this run
	NonZero  int64 // bytes of non-zero sectors found in this run
	Sent     int64 // Put Page payload bytes acknowledged in this run
	Puts     int64 // Put Page requests acknowledged in this run
	Held     int64 // data bytes not sent because the blob already held them
	GapBytes int64 // zero bytes sent inside ranges (gaps shorter than ZeroGap)
	Windows  int64 // windows finished in this run
}

// ImportResult is the outcome of a finished import.
type ImportResult struct {
	Plan
	Stats
	// NonZeroTotal is the non-zero data of the whole source (all runs);
	// BlobBytes the size of all its Put Page ranges (the non-zero data
	// plus the short zero gaps sent with it): what the blob holds.
	// SentTotal and PutsTotal are what all runs saw acknowledged; a
	// request cut off by an interruption may have landed unacknowledged,
	// and a resumed run then finds it on the blob instead of sending it.
	NonZeroTotal, BlobBytes, SentTotal, PutsTotal int64
	Duration                                      time.Duration
	// AlreadyDone: a previous run had finished; nothing was sent.
	AlreadyDone bool
}

// Import is a prepared import: the source opened, the state directory
// locked, the blob created (or checked, on resume) and leased.
type Import struct {
	o      ImportOptions
	log    *slog.Logger
	src    *Source
	lock   *statedir.Lock
	dir    string
	img    *os.File
	prog   *progress
	held   heldSet
	lease  string
	plan   Plan
	ext    []span
	closed bool
	final  bool // vhdsync.json already written by an earlier run

	scanned, nonZero, sent, puts, skipped, gap, windows atomic.Int64
}

// Plan returns what the import will do.
func (im *Import) Plan() Plan { return im.plan }

// Stats returns the counters of this run so far.
func (im *Import) Stats() Stats {
	return Stats{Scanned: im.scanned.Load(), NonZero: im.nonZero.Load(), Sent: im.sent.Load(), Puts: im.puts.Load(),
		Held: im.skipped.Load(), GapBytes: im.gap.Load(), Windows: im.windows.Load()}
}

// Close releases what Prepare took (file handles, the state directory's
// lock). The blob's lease stays until Run finishes, so an interrupted
// import keeps the blob to itself until it is resumed.
func (im *Import) Close() error {
	if im.closed {
		return nil
	}
	im.closed = true
	var errs []error
	if im.img != nil {
		errs = append(errs, im.img.Close())
	}
	if im.src != nil {
		errs = append(errs, im.src.Close())
	}
	im.lock.Unlock()
	return errors.Join(errs...)
}

// PrepareImport opens the source and the state directory, and creates the
// blob (or, resuming, checks the source, the blob and the recorded
// progress against each other). Close the result when done.
func PrepareImport(ctx context.Context, o ImportOptions) (im *Import, err error) {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.ZeroGap == 0 {
		o.ZeroGap = DefaultZeroGap
	}
	if o.ZeroGap < sector {
		return nil, fmt.Errorf("zero gap %d: at least 512 bytes", o.ZeroGap)
	}
	if o.SaveInterval <= 0 {
		o.SaveInterval = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	dir, err := filepath.Abs(o.StateDir)
	if err != nil {
		return nil, err
	}
	im = &Import{o: o, log: o.Logger, dir: dir}

	// The state directory: an unfinished import of ours, or new/empty.
	if st, err := os.Stat(dir); err == nil && !st.IsDir() {
		return nil, statedir.CheckNew(dir) // a file: says so
	}
	prog, perr := loadProgress(dir)
	resuming := perr == nil
	if perr != nil && !errors.Is(perr, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %w", statedir.ErrNotState, perr)
	}
	_, stErr := os.Stat(filepath.Join(dir, statedir.StateFile))
	finished := stErr == nil
	if !resuming {
		if err := statedir.CheckNew(dir); err != nil {
			return nil, err
		}
	}
	madeDir := false
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		madeDir = true
	}
	// Durably: the progress saved in it must survive a power loss.
	if err := durable.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	lock, err := (&statedir.Dir{Path: dir}).TryLock("importing " + o.Source)
	if err != nil {
		return nil, err
	}
	im.lock = lock
	self := im
	defer func() {
		if err != nil {
			self.Close()
			// A first run that failed before it made the blob leaves
			// nothing; once the blob exists, the progress stays so that a
			// rerun resumes instead of finding the blob in its way.
			if !resuming && (self.prog == nil || !self.prog.BlobCreated) {
				cleanNewDir(dir, madeDir)
			}
		}
	}()

	src, err := OpenSource(o.Source, o.Format)
	if err != nil {
		return nil, err
	}
	im.src = src
	loc := o.Client.Location()
	if resuming {
		if err := prog.Source.Check(src.Identity); err != nil {
			return nil, fmt.Errorf("%w; the blob %s holds part of the old contents. Import the changed disk into a new blob and state directory, or restore the file as it was and rerun", err, prog.BlobURL)
		}
		if prog.BlobURL != loc.URL() {
			return nil, fmt.Errorf("%w: the interrupted import in %s was to %s, not %s; rerun with --blob %s, or use another --state", statedir.ErrNotState, dir, prog.BlobURL, loc.URL(), prog.BlobURL)
		}
		if prog.VirtualSize != src.VirtualSize || prog.DataSize != src.DataSize {
			return nil, fmt.Errorf("%w: recorded size %d bytes, the source gives %d", ErrSourceChanged, prog.VirtualSize, src.VirtualSize)
		}
		if finished {
			im.final = true
		}
	} else {
		name := o.Name
		if name == "" {
			name = strings.TrimSuffix(path.Base(loc.Blob), ".vhd")
		}
		if name == "" || strings.ContainsAny(name, "/\x00") {
			return nil, fmt.Errorf("disk name %q: must be a plain file name (choose one with --name)", name)
		}
		footer := vhdlayer.NewFixedFooter(uint64(src.VirtualSize), o.Now())
		raw := footer.Encode()
		prog = &progress{
			Version: progressVersion, Source: src.Identity, Kind: src.Kind, DataSize: src.DataSize,
			BlobURL: loc.URL(), VirtualSize: src.VirtualSize, Footer: raw[:], LeaseID: uuid.NewString(),
			Name: name, WindowSize: WindowSize, Overwrite: o.Overwrite, StartedAt: o.Now().UTC(),
		}
		if err := prog.save(dir, true); err != nil {
			return nil, err
		}
	}
	im.prog = prog
	im.lease = prog.LeaseID
	footer, err := vhdlayer.DecodeFooter(prog.Footer)
	if err != nil {
		return nil, fmt.Errorf("%w: the footer recorded in %s: %w", statedir.ErrNotState, ProgressFile, err)
	}
	im.plan = Plan{Kind: src.Kind, SourcePath: src.Identity.Path, DataSize: src.DataSize, VirtualSize: src.VirtualSize,
		Footer: footer, BlobURL: loc.URL(), StateDir: dir, Name: prog.Name, Resumed: resuming, Runs: prog.Runs}
	if im.final {
		return im, nil
	}

	if err := im.ensureBlob(ctx); err != nil {
		return nil, err
	}
	ext, err := src.Extents()
	if err != nil {
		return nil, fmt.Errorf("list the allocated parts of %s: %w", src.Identity.Path, err)
	}
	im.ext = alignExtents(ext, src.VirtualSize)
	if resuming {
		ranges, err := o.Client.PageRanges(ctx, 0, src.VirtualSize)
		if err != nil {
			return nil, err
		}
		im.held = newHeldSet(ranges)
		im.plan.BlobHeld = im.held.total()
		im.checkDone()
	}
	it := windowIter{ext: im.ext}
	for w, ok := it.next(); ok; w, ok = it.next() {
		b := spansBytes(w.parts)
		im.plan.ScanTotal += b
		im.plan.WindowsTotal++
		if !prog.isDone(w.idx) {
			im.plan.ScanBytes += b
			im.plan.WindowsLeft++
		}
	}
	img, err := os.OpenFile(filepath.Join(dir, statedir.ImageFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open local image: %w", err)
	}
	im.img = img
	if err := img.Truncate(src.VirtualSize); err != nil {
		return nil, fmt.Errorf("size local image to %d bytes: %w", src.VirtualSize, err)
	}
	return im, nil
}

// cleanNewDir removes what a failed first run made in the state directory,
// so that a rerun (with --overwrite, say) finds it new again.
func cleanNewDir(dir string, madeDir bool) {
	for _, n := range []string{ProgressFile, ProgressFile + ".tmp", statedir.ImageFile, statedir.LockFile} {
		_ = os.Remove(filepath.Join(dir, n))
	}
	if madeDir {
		_ = os.Remove(dir)
	}
}

// ensureBlob creates the blob (first run, or a run killed before it was
// made), or checks it is the one this import made, and takes the lease.
func (im *Import) ensureBlob(ctx context.Context) error {
	c, p := im.o.Client, im.prog
	var raw [vhdlayer.FooterSize]byte
	copy(raw[:], p.Footer)
	create := !p.BlobCreated
	if p.BlobCreated {
		props, found, err := c.ReadFooter(ctx)
		switch {
		case errors.Is(err, pageblob.ErrBlobNotFound):
			im.plan.Reset = "the blob had been deleted; it was created again and the import starts over"
			p.DoneBelow, p.Done, p.BlobBytesDone, p.NonZeroDone = 0, nil, 0, 0
			create = true
		case err != nil:
			return err
		case found != raw || props.Length != p.VirtualSize+vhdlayer.FooterSize:
			f, _ := vhdlayer.DecodeFooterUnchecked(found[:])
			return fmt.Errorf("%w: %s now has %d bytes and disk id %s, but the interrupted import in %s created it with disk id %s. Someone replaced it; to start over, remove %s and import again (with --overwrite to replace the blob)",
				ErrBlobReplaced, c.Location().URL(), props.Length, f.UniqueID, im.dir, im.plan.Footer.UniqueID, im.dir)
		}
	} else if im.plan.Resumed {
		// Killed between saving the first progress and creating the blob:
		// it may exist already, made by that run.
		if _, found, err := c.ReadFooter(ctx); err == nil && found == raw {
			create = false
		}
	}
	if create {
		im.log.Debug("creating page blob", "blob", c.Location().URL(), "virtual_size", p.VirtualSize, "auth", c.AuthMethod())
		co := pageblob.CreateOptions{
			Overwrite:       im.o.Overwrite || p.Overwrite,
			CreateContainer: im.o.CreateContainer,
			Metadata:        map[string]string{"vhdsync_disk_id": im.plan.Footer.UniqueID.String()},
		}
		err := c.Create(ctx, uint64(p.VirtualSize), raw, co)
		if errors.Is(err, pageblob.ErrLeased) && co.Overwrite && im.o.BreakLease {
			// The blob to replace is leased (an abandoned import, a dead
			// mount): break the lease, then replace it.
			im.log.Warn("breaking the lease on the blob to replace", "blob", c.Location().URL())
			if err = c.BreakLease(ctx); err == nil {
				err = c.Create(ctx, uint64(p.VirtualSize), raw, co)
			}
		}
		if err != nil {
			return err
		}
		p.BlobCreated = true
		if err := p.save(im.dir, true); err != nil {
			return err
		}
	}
	return im.acquireLease(ctx)
}

func (im *Import) acquireLease(ctx context.Context) error {
	c := im.o.Client
	if _, err := c.AcquireLease(ctx, im.lease); err != nil {
		if !errors.Is(err, pageblob.ErrLeased) || !im.o.BreakLease {
			if errors.Is(err, pageblob.ErrLeased) {
				return fmt.Errorf("%w (an import holds the blob's lease until it finishes; if the other writer is surely gone, rerun with --break-lease)", err)
			}
			return err
		}
		im.log.Warn("breaking another writer's lease", "blob", c.Location().URL())
		if err := c.BreakLease(ctx); err != nil {
			return err
		}
		if _, err := c.AcquireLease(ctx, im.lease); err != nil {
			return err
		}
	}
	return nil
}

// checkDone compares the windows recorded as done with the blob's page
// ranges. The Put Page ranges of done windows were all acknowledged, so
// the blob must hold at least that many bytes inside them; if it does not
// (pages cleared since), the record is dropped and every window rescanned;
// nothing the blob holds is sent again either way.
func (im *Import) checkDone() {
	p := im.prog
	held := im.held.bytesIn(0, min(p.DoneBelow, im.plan.VirtualSize/WindowSize+1)*WindowSize)
	for _, d := range p.Done {
		held += im.held.bytesIn(d*WindowSize, (d+1)*WindowSize)
	}
	if held < p.BlobBytesDone {
		im.plan.Reset = fmt.Sprintf("the blob holds %d bytes in the ranges recorded as done, fewer than the %d sent there; every range is checked again", held, p.BlobBytesDone)
		p.DoneBelow, p.Done, p.BlobBytesDone, p.NonZeroDone = 0, nil, 0, 0
	}
}

// Run sends what the blob lacks, then finishes the state directory:
// vhdsync.json written last, the lease released, the progress removed.
// When it fails or ctx ends, the progress is saved first, so running the
// same import again continues from there.
func (im *Import) Run(ctx context.Context) (ImportResult, error) {
	start := time.Now()
	res := ImportResult{Plan: im.plan}
	if im.final {
		res.AlreadyDone = true
		res.NonZeroTotal, res.BlobBytes, res.SentTotal, res.PutsTotal = im.prog.NonZeroDone, im.prog.BlobBytesDone, im.prog.SentTotal, im.prog.PutsTotal
		return res, im.finish(ctx)
	}
	p := im.prog
	p.Runs++
	tr := newTracker(p)
	// What was done when this run began; the saver replaces *p as it goes.
	loaded := progress{DoneBelow: p.DoneBelow, Done: p.Done}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	// Saver: the image is synced before the record that claims its windows.
	var saveMu sync.Mutex
	sentBefore, putsBefore := p.SentTotal, p.PutsTotal
	save := func(sync bool) error {
		saveMu.Lock()
		defer saveMu.Unlock()
		snap := *p
		tr.record(&snap)
		if err := im.img.Sync(); err != nil {
			return fmt.Errorf("sync local image: %w", err)
		}
		snap.SentTotal, snap.PutsTotal = sentBefore+im.sent.Load(), putsBefore+im.puts.Load()
		snap.UpdatedAt = im.o.Now().UTC()
		if err := snap.save(im.dir, sync); err != nil {
			return err
		}
		*p = snap
		return nil
	}
	stopSaver := make(chan struct{})
	saverDone := make(chan struct{})
	go func() {
		defer close(saverDone)
		t := time.NewTicker(im.o.SaveInterval)
		defer t.Stop()
		for {
			select {
			case <-stopSaver:
				return
			case <-t.C:
				if err := save(false); err != nil {
					cancel(err)
					return
				}
			}
		}
	}()

	work := make(chan window)
	var wg sync.WaitGroup
	for range im.o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, WindowSize)
			for w := range work {
				if err := im.doWindow(ctx, w, buf, tr); err != nil {
					cancel(err)
					return
				}
			}
		}()
	}
	it := windowIter{ext: im.ext}
dispatch:
	for w, ok := it.next(); ok; w, ok = it.next() {
		if loaded.isDone(w.idx) {
			tr.passed(w.idx, false)
			continue
		}
		tr.passed(w.idx, true)
		select {
		case work <- w:
		case <-ctx.Done():
			break dispatch
		}
	}
	if ctx.Err() == nil {
		tr.finishedAll()
	}
	close(work)
	wg.Wait()
	close(stopSaver)
	<-saverDone
	runErr := context.Cause(ctx)
	saveErr := save(true)
	res.Stats = im.Stats()
	res.NonZeroTotal, res.BlobBytes, res.SentTotal, res.PutsTotal = p.NonZeroDone, p.BlobBytesDone, p.SentTotal, p.PutsTotal
	res.Duration = time.Since(start)
	if runErr != nil {
		if saveErr != nil {
			return res, fmt.Errorf("%w (and saving the progress failed: %v)", runErr, saveErr)
		}
		return res, runErr
	}
	if saveErr != nil {
		return res, saveErr
	}
	return res, im.finish(ctx)
}

// doWindow reads one window, writes its data to the local image and sends
// the parts the blob lacks.
func (im *Import) doWindow(ctx context.Context, w window, buf []byte, tr *tracker) error {
	base := w.off()
	first, last := w.parts[0], w.parts[len(w.parts)-1]
	clear(buf[first.off-base : last.end-base])
	var runs []span
	var nz, scanned int64
	for _, pt := range w.parts {
		lo, hi := pt.off-base, pt.end-base
		if _, err := im.src.ReadAt(buf[lo:hi], pt.off); err != nil {
			return err
		}
		r, n := scanZeros(buf, lo, hi)
		runs = append(runs, r...)
		nz += n
		scanned += hi - lo
	}
	for _, r := range mergeRuns(runs, imageGap) {
		if _, err := im.img.WriteAt(buf[r.off:r.end], base+r.off); err != nil {
			return fmt.Errorf("write local image at %d: %w", base+r.off, err)
		}
	}
	var blobBytes, held int64
	for _, r := range mergeRuns(runs, im.o.ZeroGap) {
		blobBytes += r.len()
		held += r.len()
		for _, m := range im.held.missing(base+r.off, base+r.end) {
			held -= m.len()
			if err := ctx.Err(); err != nil {
				return context.Cause(ctx)
			}
			if err := im.o.Client.PutPagesCond(ctx, m.off, buf[m.off-base:m.end-base], im.lease, nil); err != nil {
				if ctx.Err() != nil {
					return context.Cause(ctx)
				}
				return fmt.Errorf("%w; rerun the same command to resume", err)
			}
			im.sent.Add(m.len())
			im.puts.Add(1)
		}
	}
	im.gap.Add(blobBytes - nz)
	im.skipped.Add(held)
	im.scanned.Add(scanned)
	im.nonZero.Add(nz)
	im.windows.Add(1)
	tr.done(w.idx, blobBytes, nz)
	return nil
}

// finish writes vhdsync.json (last: a directory with it is complete),
// releases the lease and removes the progress.
func (im *Import) finish(ctx context.Context) error {
	p := im.prog
	if im.img != nil {
		if err := im.img.Sync(); err != nil {
			return fmt.Errorf("sync local image: %w", err)
		}
	}
	if !im.final {
		seq, err := im.o.Client.Sequence(ctx)
		if err != nil {
			return fmt.Errorf("read the blob's sequence number: %w; rerun the same command to finish", err)
		}
		if err := im.o.Client.ReleaseLease(ctx, im.lease); err != nil {
			return fmt.Errorf("release the import's lease: %w; rerun the same command to finish", err)
		}
		f := im.plan.Footer
		d := &statedir.Dir{Path: im.dir, State: statedir.State{
			Version: statedir.FormatVersion, Name: p.Name, BlobURL: p.BlobURL, VirtualSize: uint64(p.VirtualSize),
			DiskID: f.UniqueID.String(), Geometry: f.Geometry.String(), Footer: p.Footer, CreatedAt: im.o.Now().UTC(),
		}}
		d.State.SetBase(seq)
		if err := d.Save(); err != nil {
			return fmt.Errorf("write the state file: %w; rerun the same command to finish", err)
		}
	}
	if err := os.Remove(filepath.Join(im.dir, ProgressFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", ProgressFile, err)
	}
	return nil
}
