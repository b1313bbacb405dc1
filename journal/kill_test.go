package journal

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The kill -9 test of the journal (invariant 1) with a real process: the
// test binary runs itself as a child that appends records and prints each
// one after Append returned; the parent SIGKILLs it at a random moment and
// checks that the journal, reopened, holds every acknowledged record
// intact.

const (
	kill9DirEnv   = "VHDSYNC_KILL9_DIR"
	kill9CycleEnv = "VHDSYNC_KILL9_CYCLE"
)

// kill9Options keep segments and epochs small so that the child rolls
// segment files and closes epochs by size as well as by barrier.
var kill9Options = Options{SegmentBytes: 256 << 10, MaxEpochBytes: 64 << 10}

// kill9Record is record i of cycle c. Its offset names it, so any record
// found in the journal can be checked against what it must contain.
func kill9Record(c, i int) Record {
	rng := rand.New(rand.NewPCG(uint64(c), uint64(i)))
	r := Record{Offset: int64(c<<24|i) * 4096, Length: int64(1+rng.IntN(32)) * SectorSize, Kind: KindData}
	switch rng.IntN(8) {
	case 0:
		r.Kind = KindZero
	case 1:
		r.Kind = KindDiscard
	default:
		r.Data = make([]byte, r.Length)
		var key [32]byte
		binary.LittleEndian.PutUint64(key[:], uint64(c))
		binary.LittleEndian.PutUint64(key[8:], uint64(i))
		rand.NewChaCha8(key).Read(r.Data)
	}
	return r
}

func kill9Name(r Record) (c, i int) {
	n := int(r.Offset / 4096)
	return n >> 24, n & (1<<24 - 1)
}

// TestJournalKill9Child is the child process; it does nothing unless run
// by TestJournalKill9.
func TestJournalKill9Child(t *testing.T) {
	dir := os.Getenv(kill9DirEnv)
	if dir == "" {
		t.Skip("the child process of TestJournalKill9")
	}
	c, _ := strconv.Atoi(os.Getenv(kill9CycleEnv))
	j, err := Open(dir, kill9Options)
	if err != nil {
		fmt.Printf("ERR open: %v\n", err)
		os.Exit(2)
	}
	rng := rand.New(rand.NewPCG(uint64(c), 0))
	// The parent kills the child long before this; the limit only stops a
	// child whose parent died.
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		r := kill9Record(c, i)
		if err := j.Append(context.Background(), &r); err != nil {
			fmt.Printf("ERR append %d: %v\n", i, err)
			os.Exit(3)
		}
		// One write(2) per line: a line the parent reads is whole.
		fmt.Printf("ACK %d %d %d %08x\n", i, r.Seq, r.Epoch, crc32.ChecksumIEEE(r.Data))
		if rng.IntN(12) == 0 {
			closed, err := j.Barrier()
			if err != nil {
				fmt.Printf("ERR barrier: %v\n", err)
				os.Exit(3)
			}
			fmt.Printf("BARRIER %d %d\n", i, closed)
		}
	}
	os.Exit(4)
}

type kill9Ack struct {
	c, i       int
	seq, epoch uint64
	crc        uint32
}

type kill9Barrier struct {
	c, i   int
	closed uint64
}

// TestJournalKill9 runs several kill -9 cycles on one journal directory.
func TestJournalKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	dir := t.TempDir() // the real file system: this test is about files
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	var acks []kill9Ack
	var barriers []kill9Barrier
	var maxSeq, maxEpoch uint64
	unacked := 0
	const cycles = 5
	for c := 1; c <= cycles; c++ {
		killAfter := 1 + rng.IntN(300)
		cmd := exec.Command(os.Args[0], "-test.run=^TestJournalKill9Child$", "-test.count=1")
		cmd.Env = append(os.Environ(), kill9DirEnv+"="+dir, kill9CycleEnv+"="+strconv.Itoa(c))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		n, killed := 0, false
		var cycleAcks []kill9Ack
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			switch {
			case len(f) == 5 && f[0] == "ACK":
				a := kill9Ack{c: c}
				a.i, _ = strconv.Atoi(f[1])
				a.seq, _ = strconv.ParseUint(f[2], 10, 64)
				a.epoch, _ = strconv.ParseUint(f[3], 10, 64)
				crc, _ := strconv.ParseUint(f[4], 16, 32)
				a.crc = uint32(crc)
				cycleAcks = append(cycleAcks, a)
				n++
				if n == killAfter {
					if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
						t.Fatal(err)
					}
					killed = true
				}
			case len(f) == 3 && f[0] == "BARRIER":
				b := kill9Barrier{c: c}
				b.i, _ = strconv.Atoi(f[1])
				b.closed, _ = strconv.ParseUint(f[2], 10, 64)
				barriers = append(barriers, b)
			case len(f) > 0 && f[0] == "ERR":
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("child: %s", sc.Text())
			}
		}
		werr := cmd.Wait()
		if !killed {
			t.Fatalf("cycle %d: the child ended by itself after %d records: %v\n%s", c, n, werr, stderr.String())
		}
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("cycle %d: child did not die of SIGKILL: %v\n%s", c, werr, stderr.String())
		}
		// The acknowledgements of one life: seqs rise, all above every seq
		// and epoch of earlier lives.
		for k, a := range cycleAcks {
			if a.i != k {
				t.Fatalf("cycle %d: ack %d is for record %d", c, k, a.i)
			}
			if k == 0 && (a.seq <= maxSeq || a.epoch <= maxEpoch) {
				t.Fatalf("cycle %d: first record seq %d epoch %d, not above the journal's %d/%d before", c, a.seq, a.epoch, maxSeq, maxEpoch)
			}
			if k > 0 && (a.seq <= cycleAcks[k-1].seq || a.epoch < cycleAcks[k-1].epoch) {
				t.Fatalf("cycle %d: record %d seq %d epoch %d after seq %d epoch %d", c, k, a.seq, a.epoch, cycleAcks[k-1].seq, cycleAcks[k-1].epoch)
			}
		}
		acks = append(acks, cycleAcks...)

		// Reopen: every acknowledged record of every life is there, intact.
		j, err := Open(dir, kill9Options)
		if err != nil {
			t.Fatalf("cycle %d: reopen after kill -9: %v", c, err)
		}
		recs := map[uint64]Record{}
		if err := j.ReadAll(func(r Record) error { recs[r.Seq] = r; return nil }); err != nil {
			j.Close()
			t.Fatalf("cycle %d: read the journal after kill -9: %v", c, err)
		}
		for _, a := range acks {
			r, ok := recs[a.seq]
			if !ok {
				j.Close()
				t.Fatalf("cycle %d: acknowledged record %d of life %d (seq %d) is gone", c, a.i, a.c, a.seq)
			}
			if rc, ri := kill9Name(r); rc != a.c || ri != a.i || r.Epoch != a.epoch || crc32.ChecksumIEEE(r.Data) != a.crc {
				j.Close()
				t.Fatalf("cycle %d: seq %d holds record %d/%d epoch %d, acknowledged as %d/%d epoch %d", c, a.seq, rc, ri, r.Epoch, a.c, a.i, a.epoch)
			}
		}
		// Every record in the journal is one that was written, whole, and
		// the only ones not acknowledged are the last life's last appends.
		lastAck := cycleAcks[len(cycleAcks)-1]
		for seq, r := range recs {
			rc, ri := kill9Name(r)
			want := kill9Record(rc, ri)
			if rc == 1000 {
				want = kill9Record(ri, 1<<20)
				want.Offset = r.Offset
			}
			if r.Kind != want.Kind || r.Length != want.Length || !bytes.Equal(r.Data, want.Data) {
				j.Close()
				t.Fatalf("cycle %d: seq %d holds a damaged record %d/%d: %s %d bytes", c, seq, rc, ri, r.Kind, r.Length)
			}
			if seq > lastAck.seq {
				if rc != c || ri <= lastAck.i {
					j.Close()
					t.Fatalf("cycle %d: seq %d above the last acknowledged %d holds record %d/%d", c, seq, lastAck.seq, rc, ri)
				}
				unacked++
			}
			maxSeq = max(maxSeq, seq)
			maxEpoch = max(maxEpoch, r.Epoch)
		}
		// Barriers: records acknowledged before one are in epochs up to the
		// one it closed, later ones after it.
		for _, b := range barriers {
			for _, a := range acks {
				if a.c == b.c && (a.i <= b.i) != (a.epoch <= b.closed) {
					j.Close()
					t.Fatalf("life %d: record %d in epoch %d, barrier after record %d closed epoch %d", b.c, a.i, a.epoch, b.i, b.closed)
				}
			}
		}
		// The journal goes on above everything it holds.
		r := kill9Record(c, 1<<20)
		r.Offset = int64(1000<<24|c) * 4096
		if err := j.Append(context.Background(), &r); err != nil {
			j.Close()
			t.Fatal(err)
		}
		if r.Seq <= maxSeq || r.Epoch <= maxEpoch {
			j.Close()
			t.Fatalf("cycle %d: after reopen, append got seq %d epoch %d; the journal holds seq %d epoch %d", c, r.Seq, r.Epoch, maxSeq, maxEpoch)
		}
		maxSeq, maxEpoch = r.Seq, r.Epoch
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("kill -9: %d cycles, %d acknowledged records all present and intact, %d barriers, %d records committed but not yet acknowledged at the kill", cycles, len(acks), len(barriers), unacked)
}
