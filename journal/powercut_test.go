package journal

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/powercut"
)

// The journal under power cuts: its directory lives on the power-cut file
// system (internal/powercut), which drops everything not made durable by
// the strict POSIX model (data by the file's fsync, names by the
// directory's). A child process appends, issues barriers and deletes
// drained epochs as the flusher does, with memtables small enough that
// badger flushes and compacts often; the parent cuts the power at a random
// moment or right after a chosen operation, kills the child at once, and
// reopens the journal on what survived: every record acknowledged before
// the last returned barrier and not deleted must be there and intact, and
// every record there must be whole (one whose deletion was lost may come
// back, and must then be readable too).

const powercutChildEnv = "VHDSYNC_POWERCUT_CHILD"

// TestJournalPowerCutChild is the child; it does nothing unless run by
// TestJournalPowerCut.
func TestJournalPowerCutChild(t *testing.T) {
	dir := os.Getenv(kill9DirEnv)
	if dir == "" || os.Getenv(powercutChildEnv) == "" {
		t.Skip("the child process of TestJournalPowerCut")
	}
	c, _ := strconv.Atoi(os.Getenv(kill9CycleEnv))
	if os.Getenv(powercutChildEnv) != "check" {
		// Small memtables: badger flushes and compacts every few hundred
		// appends. The check opens with the daemon's (the intent log's
		// replay commits more entries at once than a tiny memtable takes).
		testBadgerMemTable = 64 << 10
	}
	o := kill9Options
	o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	j, err := Open(dir, o)
	if err != nil {
		fmt.Printf("ERR open: %v\n", err)
		os.Exit(2)
	}
	if os.Getenv(powercutChildEnv) == "check" {
		// List every record, whole or not, and close cleanly.
		err := j.ReadAll(func(r Record) error {
			rc, ri := kill9Name(r)
			want := powercutRecord(rc, ri)
			whole := r.Kind == want.Kind && r.Length == want.Length && bytes.Equal(r.Data, want.Data)
			fmt.Printf("REC %d %d %d %d %08x %v\n", r.Seq, rc, ri, r.Epoch, crc32.ChecksumIEEE(r.Data), whole)
			return nil
		})
		if err != nil {
			fmt.Printf("ERR read: %v\n", err)
			os.Exit(2)
		}
		if err := j.Close(); err != nil {
			fmt.Printf("ERR close: %v\n", err)
			os.Exit(2)
		}
		fmt.Printf("END\n")
		os.Exit(0)
	}
	// Appenders in parallel, as the disk's writers are; a barrier and
	// drain loop beside them, as the disk's fsyncs and the flusher are.
	// Every line is one write(2): an ACK printed before a BARRIER line was
	// acknowledged before that barrier started.
	var out sync.Mutex
	say := func(format string, a ...any) {
		out.Lock()
		fmt.Printf(format, a...)
		out.Unlock()
	}
	const appenders = 3
	for g := range appenders {
		go func() {
			for k := 0; ; k++ {
				i := k*appenders + g
				r := powercutRecord(c, i)
				if err := j.Append(context.Background(), &r); err != nil {
					say("ERR append %d: %v\n", i, err)
					os.Exit(3)
				}
				say("ACK %d %d %d %08x\n", i, r.Seq, r.Epoch, crc32.ChecksumIEEE(r.Data))
			}
		}()
	}
	rng := rand.New(rand.NewPCG(uint64(c), 7))
	deadline := time.Now().Add(60 * time.Second)
	for n := 0; time.Now().Before(deadline); n++ {
		time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		say("BARRIER %d\n", n)
		closed, err := j.Barrier()
		if err != nil {
			say("ERR barrier: %v\n", err)
			os.Exit(3)
		}
		say("SYNCED %d %d\n", n, closed)
		if rng.IntN(3) != 0 {
			continue
		}
		// Drain what the flusher would: every closed epoch but the last.
		recs, err := j.ReadBatch(0, 1<<40, 0)
		if err != nil {
			say("ERR read: %v\n", err)
			os.Exit(3)
		}
		var drop []Record
		for _, r := range recs {
			if r.Epoch < closed {
				r.Data = nil
				drop = append(drop, r)
			}
		}
		if len(drop) > 0 {
			say("DELETING %d\n", drop[len(drop)-1].Seq)
			if err := j.Delete(drop, drop[len(drop)-1].Epoch); err != nil {
				say("ERR delete: %v\n", err)
				os.Exit(3)
			}
		}
	}
	os.Exit(4)
}

// powercutRecord is kill9Record, but one in five carries a large payload
// (64-256 KiB), which goes to its segment directly (with O_DIRECT where it
// can), not through the intent log.
func powercutRecord(c, i int) Record {
	r := kill9Record(c, i)
	if i%5 != 0 {
		return r
	}
	rng := rand.New(rand.NewPCG(uint64(c), uint64(i)+1<<40))
	r.Kind = KindData
	r.Length = int64(16+rng.IntN(49)) * 4096
	r.Data = make([]byte, r.Length)
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], uint64(c))
	binary.LittleEndian.PutUint64(key[8:], uint64(i)|1<<40)
	rand.NewChaCha8(key).Read(r.Data)
	return r
}

// journalCutMoment is an operation of the journal to cut right after.
type journalCutMoment struct {
	name string
	// match returns a fresh predicate for one life (it may keep state).
	match func() func(op powercut.Op) bool
	// most: the cut comes after the first to most-th matching operation
	// of a life (at random), so that rare operations are reached too.
	most int
	// atOpen: the operation happens when the journal opens (the replay of
	// what the last life left): the writer is cut at random, then the
	// opening of the journal right after this operation.
	atOpen bool
	// wait: how long a life waits for it before a random cut (0: 10 s).
	wait time.Duration
}

func journalOp(kind powercut.OpKind, prefix, suffix string) func() func(powercut.Op) bool {
	return func() func(powercut.Op) bool {
		return func(op powercut.Op) bool { return isJournalOp(op, kind, prefix, suffix) }
	}
}

func isJournalOp(op powercut.Op, kind powercut.OpKind, prefix, suffix string) bool {
	name, ok := strings.CutPrefix(op.Path, "st/journal/")
	return ok && op.Kind == kind && strings.HasPrefix(name, prefix) && strings.HasSuffix(name, suffix)
}

// memtableFlushRecorded matches the MANIFEST's fsync that records a table
// made since the journal directory's last fsync: a memtable flush
// (compactions fsync the directory before they record their tables).
func memtableFlushRecorded() func(powercut.Op) bool {
	fresh := false
	return func(op powercut.Op) bool {
		switch {
		case isJournalOp(op, powercut.OpCreate, "", ".sst"):
			fresh = true
		case op.Kind == powercut.OpFsyncDir && op.Path == "st/journal":
			fresh = false
		case isJournalOp(op, powercut.OpFsync, "MANIFEST", ""):
			return fresh
		}
		return false
	}
}

// truncatedLogSynced matches an fsync of a badger log that badger has
// truncated to delete it (after its memtable was flushed): that makes the
// truncation durable while the flushed table's name may not be, and a cut
// then loses the memtable's entries. The journal must never do it (see
// syncFiles); every cycle checks.
func truncatedLogSynced() func(powercut.Op) bool {
	truncated := map[string]bool{}
	return func(op powercut.Op) bool {
		switch {
		case isJournalOp(op, powercut.OpTruncate, "", ".mem"):
			truncated[op.Path] = op.Off == 0
		case isJournalOp(op, powercut.OpFsync, "", ".mem"):
			return truncated[op.Path]
		}
		return false
	}
}

var journalCutMoments = []journalCutMoment{
	{"intent log header written (file started or reused)", func() func(powercut.Op) bool {
		return func(op powercut.Op) bool {
			return isJournalOp(op, powercut.OpWrite, "ilog-", ".dat") && op.Off == 0 && op.Len <= 512
		}
	}, 3, false, 0},
	{"intent log replayed and deleted", journalOp(powercut.OpUnlink, "ilog-", ".dat"), 1, true, 0},
	{"badger log replayed and flushed", journalOp(powercut.OpFsync, "", ".sst"), 1, true, 0},
	{"segment made", journalOp(powercut.OpCreate, "seg-", ".dat"), 4, false, 0},
	{"segment reclaimed", journalOp(powercut.OpUnlink, "seg-", ".dat"), 4, false, 0},
	{"badger table synced", journalOp(powercut.OpFsync, "", ".sst"), 4, false, 0},
	{"badger table deleted", journalOp(powercut.OpUnlink, "", ".sst"), 3, false, 0},
	{"badger manifest synced", journalOp(powercut.OpFsync, "MANIFEST", ""), 6, false, 0},
	{"badger memtable flush recorded in the manifest", memtableFlushRecorded, 2, false, 0},
	{"badger log deleted", journalOp(powercut.OpUnlink, "", ".mem"), 3, false, 0},
	// The journal must never do this (see syncFiles): the life is cut at
	// random after 5 s; before the fix the cut came and badger lost the
	// flushed memtable's entries.
	{"badger log synced after badger truncated it", truncatedLogSynced, 1, false, 5 * time.Second},
	{"badger log synced", journalOp(powercut.OpFsync, "", ".mem"), 20, false, 0},
	{"journal directory synced", func() func(powercut.Op) bool {
		return func(op powercut.Op) bool { return op.Kind == powercut.OpFsyncDir && op.Path == "st/journal" }
	}, 6, false, 0},
}

// TestJournalPowerCut: cycles of a child writing the journal and a power
// cut, on one journal directory: every fourth cut at a random moment, the
// others right after a chosen operation, in turn.
func TestJournalPowerCut(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	pc := powercut.Start(t)
	// The journal's parent directory is durable: what is tested is the
	// journal's own files and directory.
	if err := os.Mkdir(pc.Path("st"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := pc.FS().Sync(); err != nil {
		t.Fatal(err)
	}
	dir := pc.Path("st/journal")
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	mustHave := map[uint64]kill9Ack{} // acknowledged before a returned barrier, never deleted
	// Every chosen moment once, a random cut every fourth cycle; with
	// VHDSYNC_POWERCUT_DURATION (make powercut), on until it has passed.
	var long time.Duration
	if v := os.Getenv("VHDSYNC_POWERCUT_DURATION"); v != "" {
		var err error
		if long, err = time.ParseDuration(v); err != nil {
			t.Fatalf("VHDSYNC_POWERCUT_DURATION=%q: %v", v, err)
		}
	}
	began := time.Now()
	minCycles := len(journalCutMoments) * 4 / 3
	checked, synced, hooked := 0, 0, 0
	var dropped int64
	var trace []string
	defer func() {
		if t.Failed() {
			t.Logf("the last cycle's operations before the cut:\n%s", strings.Join(trace[max(0, len(trace)-60):], "\n"))
		}
	}()
	c := 0
	for c < minCycles || time.Since(began) < long {
		c++
		var m, openMoment *journalCutMoment
		if c%4 != 1 {
			m = &journalCutMoments[(c-1-(c+3)/4)%len(journalCutMoments)]
			if m.atOpen {
				m, openMoment = nil, m
			}
		}
		// The operations of the journal's directory other than data
		// writes, kept for the failure message.
		trace = trace[:0]
		left := 0
		var match func(powercut.Op) bool
		if m != nil {
			left, match = 1+rng.IntN(m.most), m.match()
		}
		truncSynced := truncatedLogSynced()
		badSync := "" // a truncated badger log fsynced (read after the cut or Disarm)
		fired := pc.FS().CutAfter(func(op powercut.Op) bool {
			if op.Kind != powercut.OpWrite || op.Off == 0 && op.Len <= 512 {
				trace = append(trace, fmt.Sprintf("%s %s %s", op.Kind, op.Path, op.NewPath))
			}
			if truncSynced(op) {
				badSync = op.Path
			}
			if m == nil || !match(op) {
				return false
			}
			left--
			return left == 0
		})
		cmd := exec.Command(os.Args[0], "-test.run=^TestJournalPowerCutChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), kill9DirEnv+"="+dir, kill9CycleEnv+"="+strconv.Itoa(c), powercutChildEnv+"=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		// The cut: after the chosen operation, or at a random line (after
		// the first barrier of the first cycle, so that a barrier is
		// always in question).
		cutAt := 1 + rng.IntN(400)
		var acks []kill9Ack
		mark := 0              // acks[:mark] came before the barrier in progress
		var deletedUpTo uint64 // this life's records up to here may be gone
		var s powercut.CutStats
		cut, sawSync := false, false
		n := 0
		// handle takes one line of the child; it returns true for an error
		// the cut caused.
		handle := func(line string) bool {
			f := strings.Fields(line)
			switch {
			case len(f) == 5 && f[0] == "ACK":
				a := kill9Ack{c: c}
				a.i, _ = strconv.Atoi(f[1])
				a.seq, _ = strconv.ParseUint(f[2], 10, 64)
				a.epoch, _ = strconv.ParseUint(f[3], 10, 64)
				crc, _ := strconv.ParseUint(f[4], 16, 32)
				a.crc = uint32(crc)
				acks = append(acks, a)
			case len(f) == 2 && f[0] == "BARRIER":
				mark = len(acks)
			case len(f) == 3 && f[0] == "SYNCED":
				sawSync = true
				for _, a := range acks[:mark] {
					// An appender may print its ACK after the drain loop
					// deleted the record (seqs are unique within a life).
					if a.seq > deletedUpTo {
						mustHave[a.seq] = a
					}
				}
				synced += mark
				acks = acks[mark:]
				mark = 0
			case len(f) == 2 && f[0] == "DELETING":
				seq, _ := strconv.ParseUint(f[1], 10, 64)
				deletedUpTo = max(deletedUpTo, seq)
				for k := range mustHave {
					if k <= seq {
						delete(mustHave, k)
					}
				}
			case len(f) > 0 && f[0] == "ERR" && pc.FS().Dead():
				return true
			case len(f) > 0 && f[0] == "ERR":
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("cycle %d: child: %s\n%s", c, line, stderr.String())
			}
			return false
		}
		wait := 10 * time.Second
		if m != nil && m.wait > 0 {
			wait = m.wait
		}
		timeout := time.After(wait)
	read:
		for !cut {
			select {
			case s = <-fired:
				_ = cmd.Process.Signal(syscall.SIGKILL)
				cut = true
			case line, ok := <-lines:
				if !ok {
					break read
				}
				if handle(line) {
					s = <-fired // the armed cut fired; the child saw its EIO first
					_ = cmd.Process.Signal(syscall.SIGKILL)
					cut = true
					continue
				}
				n++
				if m == nil && n >= cutAt && (c > 1 || sawSync) {
					pc.FS().Disarm()
					_ = cmd.Process.Signal(syscall.SIGSTOP)
					s = pc.FS().Cut()
					_ = cmd.Process.Signal(syscall.SIGKILL)
					cut = true
				}
			case <-timeout:
				if m != nil && pc.FS().Disarm() {
					m = nil
					// The chosen operation did not come: cut now.
					t.Logf("cycle %d: %q did not happen within %v; cut at random", c, journalCutMoments[(c-1-(c+3)/4)%len(journalCutMoments)].name, wait)
					_ = cmd.Process.Signal(syscall.SIGSTOP)
					s = pc.FS().Cut()
					_ = cmd.Process.Signal(syscall.SIGKILL)
					cut = true
				}
			}
		}
		if !cut {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("cycle %d: the child ended by itself: %s", c, stderr.String())
		}
		// Lines the child wrote before it stopped tell what happened
		// before the cut (a barrier that returned, a deletion); those it
		// wrote after a cut made by CutAfter cannot claim anything synced
		// (every fsync fails then), and a deletion only loosens the check.
		for line := range lines {
			handle(line)
		}
		_ = cmd.Wait()
		if badSync != "" {
			t.Fatalf("cycle %d: %s was fsynced after badger truncated it to delete it", c, badSync)
		}
		dropped += s.Bytes
		if s.After != nil {
			hooked++
			t.Logf("cycle %d: cut right after %s %s (%s)", c, s.After.Kind, s.After.Path, m.name)
		}
		pc.Remount()

		// What survived: the journal opens, every record that must be
		// there is, and every record there is whole. A child reads it: a
		// process must not map files of a FUSE mount it serves itself (a
		// page fault would wait for the server, which the garbage
		// collector may have stopped), and badger maps its files.
		if openMoment != nil {
			// Cut the replay of what survived, at the chosen operation.
			left, match := 1+rng.IntN(openMoment.most), openMoment.match()
			fired := pc.FS().CutAfter(func(op powercut.Op) bool {
				if !match(op) {
					return false
				}
				left--
				return left == 0
			})
			if journalPowerCutOpen(t, pc, dir, c, fired) {
				hooked++
				t.Logf("cycle %d: the replay cut right after %s", c, openMoment.name)
				pc.Remount()
			} else {
				t.Logf("cycle %d: the replay did not reach %q", c, openMoment.name)
			}
		}
		recs := journalPowerCutCheck(t, dir, c, s.After)
		for seq, a := range mustHave {
			r, ok := recs[seq]
			if !ok {
				t.Fatalf("cycle %d: record %d of life %d (seq %d), acknowledged before a returned barrier, is gone after a power cut (%+v)", c, a.i, a.c, seq, s.After)
			}
			if r.c != a.c || r.i != a.i || r.epoch != a.epoch || r.crc != a.crc {
				t.Fatalf("cycle %d: seq %d holds record %d/%d epoch %d, acknowledged as %d/%d epoch %d", c, seq, r.c, r.i, r.epoch, a.c, a.i, a.epoch)
			}
			checked++
		}
		for seq, r := range recs {
			if !r.whole {
				t.Fatalf("cycle %d: seq %d holds a damaged record %d/%d after a power cut (%+v)", c, seq, r.c, r.i, s.After)
			}
		}
	}
	t.Logf("RELIABILITY | journal power cuts | %d cuts in %v (%d right after a chosen operation) | %d records acknowledged before a returned barrier, checked %d times after cuts | 0 lost, 0 opens failed | %d KiB of unsynced pages dropped |",
		c, time.Since(began).Round(time.Second), hooked, synced, checked, dropped>>10)
}

// powercutRec is a record the check child listed.
type powercutRec struct {
	c, i  int
	epoch uint64
	crc   uint32
	whole bool
}

// journalPowerCutCheck opens the journal in a child and returns its
// records by seq; a journal that does not open or read fails the test.
func journalPowerCutCheck(t *testing.T, dir string, c int, after *powercut.Op) map[uint64]powercutRec {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestJournalPowerCutChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), kill9DirEnv+"="+dir, kill9CycleEnv+"="+strconv.Itoa(c), powercutChildEnv+"=check")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	t.Logf("cycle %d: the check's log:\n%s", c, stderr.String())
	recs := map[uint64]powercutRec{}
	end := false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 7 && f[0] == "REC":
			seq, _ := strconv.ParseUint(f[1], 10, 64)
			var r powercutRec
			r.c, _ = strconv.Atoi(f[2])
			r.i, _ = strconv.Atoi(f[3])
			r.epoch, _ = strconv.ParseUint(f[4], 10, 64)
			crc, _ := strconv.ParseUint(f[5], 16, 32)
			r.crc, r.whole = uint32(crc), f[6] == "true"
			recs[seq] = r
		case len(f) > 0 && f[0] == "ERR":
			t.Fatalf("cycle %d: the journal after a power cut (%+v): %s", c, after, line)
		case len(f) > 0 && f[0] == "END":
			end = true
		}
	}
	if !end || err != nil {
		t.Fatalf("cycle %d: the check child: %v\n%s", c, err, out)
	}
	return recs
}

// journalPowerCutOpen opens the journal in a child (the check child) with
// a cut armed; if the cut fires, the child is killed at once and it
// returns true. If the open ends first the cut is disarmed.
func journalPowerCutOpen(t *testing.T, pc *powercut.Test, dir string, c int, fired <-chan powercut.CutStats) bool {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestJournalPowerCutChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), kill9DirEnv+"="+dir, kill9CycleEnv+"="+strconv.Itoa(c), powercutChildEnv+"=check")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-fired:
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
		return true
	case err := <-done:
		if !pc.FS().Disarm() {
			<-fired // it fired as the child ended
			return true
		}
		if err != nil {
			t.Fatalf("cycle %d: the journal's replay after a power cut: %v", c, err)
		}
		return false
	}
}
