package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// transferProgress shows an import or a download: on a terminal an mpb bar
// (bytes done of the total, MiB/s, ETA, and a note such as the bytes sent),
// otherwise a plain line every few seconds, like drainProgress.
type transferProgress struct {
	w        io.Writer
	verb     string
	total    int64
	bar      *mpb.Bar
	p        *mpb.Progress
	note     atomic.Pointer[string] // read by mpb's render goroutine
	start    time.Time
	last     time.Time
	lastLine time.Time
	every    time.Duration
}

func newTransferProgress(w io.Writer, verb string, total int64) *transferProgress {
	t := &transferProgress{w: w, verb: verb, total: total, start: time.Now(), last: time.Now(), lastLine: time.Now(), every: 5 * time.Second}
	if isTerminal(w) && termWidth(w) > 0 && total > 0 {
		t.p = mpb.New(mpb.WithOutput(w), mpb.WithWidth(40))
		t.bar = t.p.AddBar(total,
			mpb.PrependDecorators(decor.Name(verb+" "), decor.CountersKibiByte("% .1f / % .1f")),
			mpb.AppendDecorators(decor.EwmaSpeed(decor.SizeB1024(0), " % .1f", 30), decor.Name("  ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30),
				decor.Any(func(decor.Statistics) string {
					if n := t.note.Load(); n != nil {
						return *n
					}
					return ""
				})),
		)
	}
	return t
}

// update reports done bytes of the total; note is shown beside them
// ("sent 12.0 MiB").
func (t *transferProgress) update(done int64, note string) {
	now := time.Now()
	if t.bar != nil {
		n := "  " + note
		t.note.Store(&n)
		t.bar.EwmaSetCurrent(done, now.Sub(t.last))
		t.last = now
		return
	}
	if now.Sub(t.lastLine) < t.every {
		return
	}
	t.lastLine = now
	rate := float64(done) / now.Sub(t.start).Seconds()
	eta := "?"
	if rate > 0 {
		eta = time.Duration(float64(t.total-done) / rate * float64(time.Second)).Round(time.Second).String()
	}
	pct := 100.0
	if t.total > 0 {
		pct = 100 * float64(done) / float64(t.total)
	}
	if note != "" {
		note = ", " + note
	}
	fmt.Fprintf(t.w, "%s: %s of %s (%.0f%%)%s, %.1f MiB/s, ETA %s\n", t.verb, humanBytes(done), humanBytes(t.total), pct, note, rate/(1<<20), eta)
}

func (t *transferProgress) finish(ok bool) { finishBar(t.p, t.bar, ok) }

// termWidth is the terminal's width; 0 for a terminal that has none (a
// pty made without a size, as `script` makes one under a non-terminal),
// where mpb draws nothing at all: plain lines are shown there instead.
func termWidth(w io.Writer) int {
	f, ok := w.(*os.File)
	if !ok {
		return 0
	}
	cols, _, err := term.GetSize(int(f.Fd()))
	if err != nil {
		return 0
	}
	return cols
}

// watch calls poll every 250 ms until ctx ends, and once more at the end.
func watch(ctx context.Context, poll func()) (stop func()) {
	done := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				poll()
				return
			case <-ctx.Done():
				return
			case <-t.C:
				poll()
			}
		}
	}()
	return func() { close(done); <-ended }
}

// rate formats bytes per duration as MiB/s.
func rate(n int64, d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f MiB/s", float64(n)/(1<<20)/d.Seconds())
}
