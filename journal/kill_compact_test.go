package journal

import (
	"bufio"
	"bytes"
	"context"
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

// kill -9 aimed at badger's background work: the child
// appends, closes epochs and deletes drained records as the flusher does,
// with memtables so small that badger flushes a memtable and compacts
// level 0 every few hundred appends; it prints a line whenever badger says
// it is flushing or has built a compaction's tables (before installing
// them). The parent kills it at such a line, then checks that every
// acknowledged record not deleted is there and intact, and that no record
// whose deletion was acknowledged came back.

const kill9AimEnv = "VHDSYNC_KILL9_AIM"

// TestJournalKill9CompactChild is the child; it does nothing unless run by
// TestJournalKill9Compaction.
func TestJournalKill9CompactChild(t *testing.T) {
	dir := os.Getenv(kill9DirEnv)
	if dir == "" || os.Getenv(kill9AimEnv) == "" {
		t.Skip("the child process of TestJournalKill9Compaction")
	}
	c, _ := strconv.Atoi(os.Getenv(kill9CycleEnv))
	testBadgerMemTable = 64 << 10
	testBadgerEvent = func(msg string) {
		if strings.Contains(msg, "LOG Compact") || strings.Contains(msg, "Flushing memtable") {
			fmt.Printf("BADGER %s\n", strings.Join(strings.Fields(msg), "_"))
		}
	}
	j, err := Open(dir, kill9Options)
	if err != nil {
		fmt.Printf("ERR open: %v\n", err)
		os.Exit(2)
	}
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		r := kill9Record(c, i)
		if err := j.Append(context.Background(), &r); err != nil {
			fmt.Printf("ERR append %d: %v\n", i, err)
			os.Exit(3)
		}
		fmt.Printf("ACK %d %d %d %08x\n", i, r.Seq, r.Epoch, crc32.ChecksumIEEE(r.Data))
		if i%25 == 24 {
			closed, err := j.Barrier()
			if err != nil {
				fmt.Printf("ERR barrier: %v\n", err)
				os.Exit(3)
			}
			// Drain what the flusher would: every closed epoch but the last.
			recs, err := j.ReadBatch(0, 1<<40, 0)
			if err != nil {
				fmt.Printf("ERR read: %v\n", err)
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
				fmt.Printf("DELETING %d\n", drop[len(drop)-1].Seq)
				if err := j.Delete(drop, drop[len(drop)-1].Epoch); err != nil {
					fmt.Printf("ERR delete: %v\n", err)
					os.Exit(3)
				}
				fmt.Printf("DELETED %d\n", drop[len(drop)-1].Seq)
			}
		}
	}
	os.Exit(4)
}

// TestJournalKill9Compaction: kill -9 while badger flushes a memtable or
// compacts, several cycles on one journal.
func TestJournalKill9Compaction(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	dir := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	acked := map[uint64]kill9Ack{} // seq -> ack, for records not deleted
	// Deletions acknowledged (records must stay gone) and asked for (a
	// record up to there may be present or gone: the kill can land inside
	// Delete).
	var deletedUpTo, deletingUpTo uint64
	aimed, compactKills, flushKills, checkedRecs := 0, 0, 0, 0
	const cycles = 12
	for c := 1; c <= cycles; c++ {
		armAfter := 50 + rng.IntN(600)
		// Odd cycles aim at a compaction (its tables built, not yet
		// installed), even ones at a memtable flush.
		target := "LOG_Compact"
		if c%2 == 0 {
			target = "Flushing_memtable"
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestJournalKill9CompactChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), kill9DirEnv+"="+dir, kill9CycleEnv+"="+strconv.Itoa(c), kill9AimEnv+"=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		n, killed, killedAt := 0, false, ""
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			switch {
			case killed:
				// Lines already written before the kill landed: acks and
				// deletes are still true.
				fallthrough
			default:
				switch {
				case len(f) == 5 && f[0] == "ACK":
					a := kill9Ack{c: c}
					a.i, _ = strconv.Atoi(f[1])
					a.seq, _ = strconv.ParseUint(f[2], 10, 64)
					a.epoch, _ = strconv.ParseUint(f[3], 10, 64)
					crc, _ := strconv.ParseUint(f[4], 16, 32)
					a.crc = uint32(crc)
					acked[a.seq] = a
					n++
				case len(f) == 2 && f[0] == "DELETING":
					s, _ := strconv.ParseUint(f[1], 10, 64)
					deletingUpTo = max(deletingUpTo, s)
				case len(f) == 2 && f[0] == "DELETED":
					s, _ := strconv.ParseUint(f[1], 10, 64)
					deletedUpTo = max(deletedUpTo, s)
				case len(f) == 2 && f[0] == "BADGER" && !killed && n >= armAfter && strings.Contains(f[1], target):
					if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
						t.Fatal(err)
					}
					killed, killedAt = true, f[1]
				case len(f) > 0 && f[0] == "ERR":
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("child: %s", sc.Text())
				}
			}
			if !killed && n >= armAfter+5000 {
				// badger stayed quiet: kill anyway (not counted as aimed).
				cmd.Process.Signal(syscall.SIGKILL)
				killed = true
			}
		}
		werr := cmd.Wait()
		if !killed {
			t.Fatalf("cycle %d: the child ended by itself after %d records: %v\n%s", c, n, werr, stderr.String())
		}
		if killedAt != "" {
			aimed++
			if strings.Contains(killedAt, "Compact") {
				compactKills++
			} else {
				flushKills++
			}
		}
		j, err := Open(dir, kill9Options)
		if err != nil {
			t.Fatalf("cycle %d: reopen after a kill at %q: %v", c, killedAt, err)
		}
		recs := map[uint64]Record{}
		if err := j.ReadAll(func(r Record) error { recs[r.Seq] = r; return nil }); err != nil {
			j.Close()
			t.Fatalf("cycle %d: read after a kill at %q: %v", c, killedAt, err)
		}
		for s, a := range acked {
			r, ok := recs[s]
			if !ok && s <= deletingUpTo {
				delete(acked, s) // its deletion was under way at the kill
				continue
			}
			if !ok {
				j.Close()
				t.Fatalf("cycle %d (killed at %q): acknowledged record %d/%d seq %d is gone", c, killedAt, a.c, a.i, s)
			}
			if rc, ri := kill9Name(r); rc != a.c || ri != a.i || crc32.ChecksumIEEE(r.Data) != a.crc {
				j.Close()
				t.Fatalf("cycle %d (killed at %q): seq %d damaged", c, killedAt, s)
			}
			checkedRecs++
		}
		for s := range recs {
			if s <= deletedUpTo {
				j.Close()
				t.Fatalf("cycle %d (killed at %q): record seq %d came back after its deletion (up to %d) was acknowledged", c, killedAt, s, deletedUpTo)
			}
		}
		// What is gone now stays gone: the next life's deletes start above.
		for s := range acked {
			if _, ok := recs[s]; !ok || s <= deletedUpTo {
				delete(acked, s)
			}
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("kill -9 aimed at badger: %d cycles, %d killed at a badger event (%d compactions, %d memtable flushes), %d acknowledged records checked intact, deletions acknowledged up to seq %d never undone",
		cycles, aimed, compactKills, flushKills, checkedRecs, deletedUpTo)
	if aimed < cycles/2 {
		t.Errorf("only %d of %d kills landed on a badger event: the test does not aim", aimed, cycles)
	}
}
