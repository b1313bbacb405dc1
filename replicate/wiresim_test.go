package replicate

import (
	"os"
	"testing"

	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

// TestWireSim replays a kept journal (VHDSYNC_WIRESIM_JOURNAL: the journal
// directory of a state dir whose daemon ran with the remote detached, as
// the wire-efficiency workload of bench/run.sh leaves it with its remote
// killed) through the coalescer in flusher-sized batches, at several costs
// of a request, and logs the Put Page / Clear Pages calls and bytes each
// would send. It is how requestCost was chosen (BENCHMARKS.md); skipped
// without the variable.
func TestWireSim(t *testing.T) {
	dir := os.Getenv("VHDSYNC_WIRESIM_JOURNAL")
	if dir == "" {
		t.Skip("set VHDSYNC_WIRESIM_JOURNAL to a journal directory to replay")
	}
	j, err := journal.Open(dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	costs := []int64{0, 4 << 10, 16 << 10, 32 << 10, 64 << 10, requestCost, 256 << 10, 1 << 20, 1 << 50}
	type tally struct{ puts, clears, sent, cleared int64 }
	res := make([]tally, len(costs))
	var from uint64
	batches, records := 0, 0
	for {
		recs, err := j.ReadBatch(from, 64<<20, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) == 0 {
			break
		}
		batches++
		records += len(recs)
		from = recs[len(recs)-1].Seq + 1
		for i, rc := range costs {
			var c coalescer
			for k := range recs {
				c.add(&recs[k])
			}
			for _, s := range c.spansCost(remote.MaxPutPage, rc) {
				if s.Clear {
					res[i].clears++
					res[i].cleared += s.End - s.Off
				} else {
					res[i].puts++
					res[i].sent += s.End - s.Off
				}
			}
		}
	}
	t.Logf("%d batches, %d records", batches, records)
	t.Logf("| request cost (bytes) | Put Page calls | bytes sent | Clear Pages calls | bytes cleared | calls | s at 60 MiB/s | s at 500 req/s | max |")
	for i, rc := range costs {
		r := res[i]
		bs := float64(r.sent) / (60 << 20)
		cs := float64(r.puts+r.clears) / 500
		t.Logf("| %d | %d | %d | %d | %d | %d | %.2f | %.2f | %.2f |", rc, r.puts, r.sent, r.clears, r.cleared, r.puts+r.clears, bs, cs, max(bs, cs))
	}
}
