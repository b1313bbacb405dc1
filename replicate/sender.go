package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// SenderOptions tune a Sender. Zero values take the defaults.
type SenderOptions struct {
	// Workers is how many requests of one batch are in flight (default 8).
	Workers int
	// RetryMin and RetryMax bound the backoff between retries of a
	// transient failure (default 100 ms and 5 s). Retries go on forever.
	// The cap is how late the sender may notice that the remote is back:
	// with 30 s, the blob stayed up to 28 s behind after a one-minute
	// outage had ended (RELIABILITY.md); at 5 s, the 8 workers of an outage
	// that lasts an hour send about 6,000 requests, nothing to a service
	// that takes 500 a second per blob.
	RetryMin, RetryMax time.Duration
	// Logger receives retry messages.
	Logger *slog.Logger
}

// State is what a sender (and the flusher or apply worker driving it) is
// doing.
type State string

// States, as status shows them.
const (
	StateIdle     State = "idle"
	StateDraining State = "draining"
	StateRetrying State = "retrying"
	StateFailed   State = "failed"
	StateStopped  State = "stopped"
)

// SenderStats is a snapshot of a sender's counters.
type SenderStats struct {
	State          State
	LastError      string
	RemoteSequence int64
	PutCalls       uint64
	ClearCalls     uint64
	SequenceCalls  uint64
	BytesSent      uint64
	BytesCleared   uint64
	Retries        uint64
	// FilledBytes are clean bytes read from the image and sent inside Put
	// Pages to join pending ranges (fills); UnfilledBytes the planned fill
	// bytes that were not sent (written since the plan, or holes).
	FilledBytes, UnfilledBytes uint64
	// Throttled counts the answers the service refused for its rate
	// limits (sent again); InFlightLimit is the remote's adaptive limit on
	// requests in flight (0: the remote does not pace itself).
	Throttled     uint64
	InFlightLimit int
}

// Sender is the one fenced writer of epochs to the blob: both the flusher
// (direct transfer) and the staged apply worker send through it, so the
// ordering rule (invariant 3, see SendEpochs) is written once. It also
// owns the retry policy and the request counters.
type Sender struct {
	r     remote.Remote
	lease string
	o     SenderOptions
	log   *slog.Logger
	seq   atomic.Int64

	mu      sync.Mutex
	state   State
	lastErr error

	puts, clears, seqCalls, sent, cleared, retries atomic.Uint64
	filled, unfilled                               atomic.Uint64
	onLanded                                       atomic.Pointer[func(last uint64)]
}

// OnLanded sets fn to be called once every span of a batch sent without
// an odd mark (a single epoch) has landed, before the even mark that
// completes it. The blob then holds the disk at the barrier that closed
// that epoch: no barrier lies inside an epoch, so the blob was a state the
// disk could have had all along, and now it is that barrier's. Only its
// label (the sequence number) still names the previous epoch. A
// synchronous barrier may return here, a round trip before the mark.
func (s *Sender) OnLanded(fn func(last uint64)) { s.onLanded.Store(&fn) }

// NewSender prepares a sender for remote r, whose sequence number is seq
// now; lease is the lease id every write carries.
func NewSender(r remote.Remote, lease string, seq remote.Sequence, o SenderOptions) *Sender {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.RetryMin <= 0 {
		o.RetryMin = 100 * time.Millisecond
	}
	if o.RetryMax <= 0 {
		o.RetryMax = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Sender{r: r, lease: lease, o: o, log: o.Logger, state: StateIdle}
	s.seq.Store(int64(seq))
	return s
}

// Remote is the blob the sender writes.
func (s *Sender) Remote() remote.Remote { return s.r }

// Lease is the lease id every write carries.
func (s *Sender) Lease() string { return s.lease }

// Sequence is the blob's sequence number as last known.
func (s *Sender) Sequence() remote.Sequence { return remote.Sequence(s.seq.Load()) }

// SetSequence records the blob's sequence number read from the service.
func (s *Sender) SetSequence(seq remote.Sequence) { s.seq.Store(int64(seq)) }

// SetState records what the sender's driver is doing; err, when set, is
// shown as the last error.
func (s *Sender) SetState(st State, err error) {
	s.mu.Lock()
	s.state = st
	if err != nil {
		s.lastErr = err
	} else if st != StateRetrying {
		s.lastErr = nil
	}
	s.mu.Unlock()
}

// state returns the state and the last error.
func (s *Sender) stateErr() (State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state, s.lastErr
}

// Stats returns the sender's counters.
func (s *Sender) Stats() SenderStats {
	st, err := s.stateErr()
	out := SenderStats{State: st}
	if err != nil {
		// The first line only: the SDK's error text repeats the request.
		out.LastError, _, _ = strings.Cut(err.Error(), "\n")
	}
	out.RemoteSequence = s.seq.Load()
	out.PutCalls = s.puts.Load()
	out.ClearCalls = s.clears.Load()
	out.SequenceCalls = s.seqCalls.Load()
	out.BytesSent = s.sent.Load()
	out.BytesCleared = s.cleared.Load()
	out.Retries = s.retries.Load()
	out.FilledBytes = s.filled.Load()
	out.UnfilledBytes = s.unfilled.Load()
	if t, ok := s.r.(remote.Throttling); ok {
		out.Throttled = t.Throttled()
		out.InFlightLimit = t.InFlightLimit()
	}
	return out
}

// SendEpochs writes one batch, the coalesced spans of whole epochs
// first..last, to the blob in order. With alwaysMark the in-progress mark
// is set even for a single epoch (the staged apply worker does, so that
// its progress is always readable from the blob).
//
// Ordering (invariant 3), and why a request that may or may not have
// landed can never overwrite newer data:
//   - Batches are sent one at a time; the next starts only when every
//     request of this one has been acknowledged. Within a batch the spans
//     are disjoint, so their order does not matter, and each sector gets the
//     last value the batch wrote to it.
//   - A batch of several epochs is marked in progress first: the blob's
//     sequence number is raised to remote.Started(last) (odd). When all
//     spans are in, it is raised to remote.Complete(last) (even): the blob
//     is exactly the disk at the barrier that closed epoch last. A
//     single-epoch batch needs no mark: any subset of one epoch is a state
//     the disk itself may show.
//   - Every Put Page and Clear Pages carries the lease and the condition
//     "sequence number == the value at the start of the batch" (the odd
//     mark, or the previous even value). Every batch moves the sequence
//     number past that value when it completes, and it only ever rises
//     (max), so a request of this batch delayed in the network is refused
//     by the service (412) once the batch is over: it can never land on
//     top of a later batch. Retries within the batch resend the same bytes
//     to the same disjoint span, which is idempotent.
//
// preempt, when set, is asked before each span is handed to a worker,
// with the spans not handed out yet; when it answers true the
// batch stops unfinished and SendEpochs returns ErrPreempted. The blob is
// then odd (or still at the batch's fence), and the caller must send a
// superset of the batch (the same first epoch, a later last one) next:
// its mark is above this batch's fence, so a request of this batch still
// in the network is refused, and it rewrites every sector this batch may
// have written (see Flusher's preemption).
func (s *Sender) SendEpochs(ctx context.Context, first, last uint64, spans []Span, alwaysMark bool, preempt func(rest []Span) bool) error {
	fence := s.Sequence()
	marked := alwaysMark || first != last || fence.InProgress()
	if marked {
		mark := remote.Started(last)
		if err := s.Retry(ctx, "mark batch in progress", func(ctx context.Context) error {
			return s.r.RaiseSequence(ctx, int64(mark), s.lease)
		}); err != nil {
			return err
		}
		s.seqCalls.Add(1)
		if s.Sequence() < mark {
			s.SetSequence(mark)
		}
		fence = max(mark, s.Sequence())
	}
	f := int64(fence)
	if err := s.sendSpans(ctx, spans, remote.Cond{LeaseID: s.lease, IfSequenceEq: &f}, preempt); err != nil {
		return err
	}
	if fn := s.onLanded.Load(); fn != nil && !marked {
		(*fn)(last)
	}
	done := remote.Complete(last)
	if err := s.Retry(ctx, "mark batch complete", func(ctx context.Context) error {
		return s.r.RaiseSequence(ctx, int64(done), s.lease)
	}); err != nil {
		return err
	}
	s.seqCalls.Add(1)
	s.SetSequence(max(done, s.Sequence()))
	return nil
}

// sendSpans sends the disjoint spans of one batch with the configured
// number of workers and returns when all are acknowledged, or on the first
// permanent error.
func (s *Sender) sendSpans(ctx context.Context, spans []Span, c remote.Cond, preempt func([]Span) bool) error {
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan Span)
	errc := make(chan error, s.o.Workers)
	var wg sync.WaitGroup
	for w := 0; w < min(s.o.Workers, len(spans)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sp := range work {
				if err := s.sendSpan(ctx, sp, c); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		}()
	}
	// A feed cut short by a failed worker is reported through errc, one
	// cut by the caller through ctx.Err below.
	preempted := false
	for i, sp := range spans {
		if preempt != nil && preempt(spans[i:]) {
			// No more spans are handed out; those in flight finish, so
			// every request that reached the blob is one the counters
			// (and the caller) know of.
			preempted = true
			break
		}
		if feed(ctx, []Span{sp}, work) != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	if preempted && parent.Err() == nil {
		return ErrPreempted
	}
	return ctx.Err()
}

// ErrPreempted: the batch was stopped unfinished for a superset (see
// SendEpochs).
var ErrPreempted = errors.New("batch preempted by a larger one")

// sendSpan sends one span, retried until it lands or fails for good. A
// planned span is loaded first and sent as the requests it becomes.
func (s *Sender) sendSpan(ctx context.Context, sp Span, c remote.Cond) error {
	if sp.Load != nil {
		subs, st, err := sp.Load(ctx)
		if err != nil {
			return fmt.Errorf("read the payload of %d+%d: %w", sp.Off, sp.End-sp.Off, err)
		}
		s.filled.Add(uint64(st.Filled))
		s.unfilled.Add(uint64(st.Unfilled))
		for _, sub := range subs {
			if err := s.sendSpan(ctx, sub, c); err != nil {
				return err
			}
		}
		return nil
	}
	if sp.Clear {
		err := s.Retry(ctx, "clear pages", func(ctx context.Context) error {
			return s.r.ClearPages(ctx, sp.Off, sp.End-sp.Off, c)
		})
		if err == nil {
			s.clears.Add(1)
			s.cleared.Add(uint64(sp.End - sp.Off))
		}
		return err
	}
	err := s.Retry(ctx, "put page", func(ctx context.Context) error {
		return s.r.PutPages(ctx, sp.Off, sp.Data, c)
	})
	if err == nil {
		s.puts.Add(1)
		s.sent.Add(uint64(sp.End - sp.Off))
	}
	return err
}

// feed hands items to workers until all are taken or ctx ends.
func feed[T any](ctx context.Context, items []T, work chan<- T) error {
	for _, it := range items {
		select {
		case work <- it:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Retry runs op until it succeeds, fails permanently, or ctx ends.
// Transient failures back off exponentially from RetryMin to RetryMax, with
// jitter, and are counted and shown in the state.
func (s *Sender) Retry(ctx context.Context, what string, op func(context.Context) error) error {
	wait := s.o.RetryMin
	for attempt := 1; ; attempt++ {
		err := op(ctx)
		if err == nil {
			if attempt > 1 {
				s.SetState(StateDraining, nil)
				s.log.Info("remote answers again", "op", what, "attempts", attempt)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !remote.IsTransient(err) {
			return fmt.Errorf("%s: %w", what, err)
		}
		s.retries.Add(1)
		s.SetState(StateRetrying, err)
		if attempt == 1 || attempt%10 == 0 {
			s.log.Warn("remote request failed, retrying", "op", what, "attempt", attempt, "err", err)
		}
		d := wait/2 + rand.N(wait/2+1)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
		wait = min(wait*2, s.o.RetryMax)
	}
}
