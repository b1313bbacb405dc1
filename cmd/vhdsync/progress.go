package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// drainProgress shows how much of the journal is left to send: a bar with
// bytes left, MiB/s and ETA on a terminal, plain lines otherwise (logs,
// CI, pipes).
type drainProgress struct {
	w        io.Writer
	bar      *mpb.Bar
	p        *mpb.Progress
	start    int64
	last     time.Time
	lastLine time.Time
	lastLeft int64
}

// isTerminal reports whether w is a terminal wide enough for a bar (a
// pseudo-terminal of 0 columns makes mpb draw nothing at all).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return false
	}
	cols, _, err := term.GetSize(int(f.Fd()))
	return err == nil && cols >= 40
}

func newDrainProgress(w io.Writer, pending int64) *drainProgress {
	d := &drainProgress{w: w, start: pending, last: time.Now(), lastLeft: pending}
	if isTerminal(w) && pending > 0 {
		d.p = mpb.New(mpb.WithOutput(w), mpb.WithWidth(40))
		d.bar = d.p.AddBar(pending,
			mpb.PrependDecorators(decor.Name("draining "), decor.CountersKibiByte("% .1f / % .1f")),
			mpb.AppendDecorators(decor.EwmaSpeed(decor.SizeB1024(0), " % .1f", 30), decor.Name("  ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30)),
		)
	}
	return d
}

// update reports that left bytes remain.
func (d *drainProgress) update(left int64, rate float64) {
	now := time.Now()
	if left > d.start { // new writes arrived: grow the total
		d.start = left
		if d.bar != nil {
			d.bar.SetTotal(left, false)
		}
	}
	if d.bar != nil {
		d.bar.EwmaSetCurrent(d.start-left, now.Sub(d.last))
		d.last = now
		return
	}
	if now.Sub(d.lastLine) >= 2*time.Second || left == 0 && d.lastLeft != 0 {
		eta := "?"
		if rate > 0 {
			eta = time.Duration(float64(left) / rate * float64(time.Second)).Round(time.Second).String()
		}
		fmt.Fprintf(d.w, "draining: %s left, %.1f MiB/s, ETA %s\n", humanBytes(left), rate/(1<<20), eta)
		d.lastLine = now
	}
	d.lastLeft = left
}

func (d *drainProgress) finish(ok bool) { finishBar(d.p, d.bar, ok) }

// finishBar completes (or, on failure, aborts) a bar and waits for its last
// redraw; nothing when there is no bar (not a terminal).
func finishBar(p *mpb.Progress, bar *mpb.Bar, ok bool) {
	if bar == nil {
		return
	}
	if ok {
		bar.SetTotal(-1, true)
	} else {
		bar.Abort(false)
	}
	p.Wait()
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func tickAfter() <-chan time.Time { return time.After(250 * time.Millisecond) }
