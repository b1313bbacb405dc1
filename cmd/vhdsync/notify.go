package main

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"github.com/vhdsync/vhdsync/writeback"
)

// notifyInterval is how often a draining daemon tells systemd how much is
// left (the STATUS= line `systemctl status` shows).
const notifyInterval = 2 * time.Second

// serviceNotifier speaks systemd's notify protocol for a mount run as a
// Type=notify service (dist/systemd/vhdsync@.service): READY=1 once the
// mount answers, STOPPING=1 when the drain begins, and STATUS= lines with
// what is left while it drains. It is silent unless $NOTIFY_SOCKET is set
// and the daemon is the process systemd started (a daemon that `vhdsync
// mount` put in the background is not: it reports to its parent).
type serviceNotifier struct {
	log     *slog.Logger
	enabled bool

	mu       sync.Mutex
	stopping bool          // STOPPING=1 was sent
	tick     chan struct{} // closed to end the draining ticker; nil when none runs
}

func newServiceNotifier(g *globals, log *slog.Logger) *serviceNotifier {
	return &serviceNotifier{log: log, enabled: g.env("NOTIFY_SOCKET") != "" && g.env(readyFDEnv) == ""}
}

// send writes one notification. A failure is logged and not returned:
// systemd's view of the service is all that suffers (a Type=notify unit
// whose READY=1 is lost times out and is restarted), never the disk.
func (n *serviceNotifier) send(lines ...string) {
	if !n.enabled {
		return
	}
	if _, err := sdnotify.SdNotify(false, strings.Join(lines, "\n")); err != nil {
		n.log.Warn("cannot notify systemd", "state", lines[0], "err", err)
	}
}

// ready reports the mount up: it answers at mp.
func (n *serviceNotifier) ready(mp string) {
	n.send(sdnotify.SdNotifyReady, "STATUS=serving at "+mp)
}

// wrapPhase returns setPhase extended by the notifications of each phase
// change: the first drain sends STOPPING=1, and while a drain runs a
// STATUS= line every notifyInterval says what is left.
func (n *serviceNotifier) wrapPhase(setPhase func(phase, note string), stats func() writeback.Stats) func(phase, note string) {
	if !n.enabled {
		return setPhase
	}
	return func(phase, note string) {
		setPhase(phase, note)
		n.mu.Lock()
		defer n.mu.Unlock()
		status := "STATUS=" + phase
		if note != "" {
			status += ": " + note
		}
		if phase != "draining" {
			n.stopTicker()
			n.send(status)
			return
		}
		if n.stopping {
			n.send(status + drainLeft(stats()))
		} else {
			n.stopping = true
			n.send(sdnotify.SdNotifyStopping, status+drainLeft(stats()))
		}
		if n.tick == nil {
			n.tick = make(chan struct{})
			go n.drainTicker(n.tick, stats)
		}
	}
}

// drainTicker sends the drain's progress until done is closed.
func (n *serviceNotifier) drainTicker(done chan struct{}, stats func() writeback.Stats) {
	t := time.NewTicker(notifyInterval)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			n.send("STATUS=draining" + drainLeft(stats()))
		}
	}
}

// stopTicker ends the draining ticker (n.mu held).
func (n *serviceNotifier) stopTicker() {
	if n.tick != nil {
		close(n.tick)
		n.tick = nil
	}
}

// close ends the ticker when the daemon returns.
func (n *serviceNotifier) close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopTicker()
}

// drainLeft is the ", N left" part of a draining STATUS= line.
func drainLeft(s writeback.Stats) string {
	j := s.Journal
	if j.PendingRecords == 0 {
		return ", nothing left to send"
	}
	return fmt.Sprintf(", %s in %d records left to send (flusher %s)", humanBytes(j.PendingBytes), j.PendingRecords, s.Flusher.State)
}
