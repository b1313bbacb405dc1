package pageblob

import (
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// Azure answers a blob driven past its scalability targets (a standard
// page blob: about 500 requests/s and 60 MiB/s) with 503 ServerBusy, or,
// for a request it queued too long, 500 OperationTimedOut. Both mean "the
// same request later, and fewer at once": they are back-pressure, not
// failures. Every request of a Client passes one backpressure policy per
// blob, which
//
//   - lets at most limit requests be in flight, where limit is adaptive
//     (AIMD, like TCP's congestion window): halved at a throttled answer,
//     at most once per backoff window so one burst of refusals does not
//     collapse it to 1, and raised by one after limit answers in a row
//     that were not throttled;
//   - holds every request back for a pause after a throttled answer
//     (exponential with jitter, 50 ms doubling to 2 s while answers stay
//     throttled): with the service's fast answers even one request in
//     flight can outrun a request-rate limit, so a limit on concurrency
//     alone does not stop the refusals; a shared pause does;
//   - sends a throttled request again itself, for as long as the
//     attempt's context allows, so callers (the flusher, import,
//     download, apply) see throttling only as slower requests, and never
//     fail for it while the service keeps answering.
//
// The counters (Throttled, InFlightLimit) reach status through
// remote.Throttling.
type backpressure struct {
	max int64

	mu      sync.Mutex
	cond    *sync.Cond
	limit   int64
	active  int64
	okRun   int64     // answers in a row that were not throttled
	lastCut time.Time // when limit was last halved
	until   time.Time // no request is sent before (the pause)
	gap     time.Duration

	throttled atomic.Uint64
}

// Backpressure bounds: the largest number of requests in flight per blob
// (more than any caller sends) and the backoff between resends.
const (
	maxInFlight    = 64
	throttleMinGap = 50 * time.Millisecond
	throttleMaxGap = 2 * time.Second
)

func newBackpressure() *backpressure {
	b := &backpressure{max: maxInFlight, limit: maxInFlight}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits for a place among the requests in flight.
func (b *backpressure) acquire(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ctx.Done() != nil {
		// Wake the waiters when ctx ends; Cond has no context.
		stop := context.AfterFunc(ctx, func() {
			b.mu.Lock()
			b.cond.Broadcast()
			b.mu.Unlock()
		})
		defer stop()
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if d := time.Until(b.until); d > 0 {
			// In a pause: sleep it out without the lock, then look again.
			b.mu.Unlock()
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			b.mu.Lock()
			continue
		}
		if b.active < b.limit {
			b.active++
			return nil
		}
		b.cond.Wait()
	}
}

// release gives the place back and adapts the limit to the answer.
func (b *backpressure) release(throttled bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.active--
	now := time.Now()
	switch {
	case throttled:
		b.throttled.Add(1)
		b.okRun = 0
		if now.Sub(b.lastCut) >= throttleMinGap*2 {
			b.limit = max(1, b.limit/2)
			b.lastCut = now
		}
		if now.After(b.until) {
			b.gap = min(max(b.gap*2, throttleMinGap), throttleMaxGap)
			b.until = now.Add(b.gap/2 + rand.N(b.gap/2+1))
		}
	default:
		b.gap = 0
		b.okRun++
		if b.okRun >= b.limit && b.limit < b.max {
			b.limit++
			b.okRun = 0
		}
	}
	b.cond.Broadcast()
}

// InFlightLimit is the current adaptive limit on requests in flight.
func (b *backpressure) InFlightLimit() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return int(b.limit)
}

// isThrottledResponse reports whether resp is the service's back-pressure.
func isThrottledResponse(resp *http.Response) bool {
	if resp == nil {
		return false
	}
	code := resp.Header.Get("x-ms-error-code")
	switch resp.StatusCode {
	case http.StatusServiceUnavailable:
		return code == "" || code == "ServerBusy"
	case http.StatusInternalServerError:
		return code == "OperationTimedOut"
	case http.StatusTooManyRequests:
		return true
	}
	return false
}

// policy is the per-attempt pipeline stage (after the SDK's own retry
// policy, so its per-try timeout bounds the resends).
func (b *backpressure) policy() policy.Policy { return policyFunc(b.do) }

func (b *backpressure) do(req *policy.Request) (*http.Response, error) {
	ctx := req.Raw().Context()
	for {
		if err := b.acquire(ctx); err != nil {
			return nil, err
		}
		resp, err := req.Next()
		throttled := err == nil && isThrottledResponse(resp)
		b.release(throttled)
		if !throttled {
			return resp, err
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < throttleMaxGap+time.Second {
			// No time left in this attempt: the caller sees the answer
			// (transient) and decides.
			return resp, err
		}
		// The answer is dropped for a resend (after the pause, in
		// acquire): read it to the end so the connection is reused.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if err := req.RewindBody(); err != nil {
			return nil, err
		}
	}
}

// policyFunc adapts a function to policy.Policy.
type policyFunc func(*policy.Request) (*http.Response, error)

// Do implements policy.Policy.
func (f policyFunc) Do(req *policy.Request) (*http.Response, error) { return f(req) }
