package pageblob

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"syscall"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// ErrUnreachable means the storage endpoint could not be reached at all:
// the connection was refused, the host name does not resolve, or the
// connection could not be made in time. No request reached the service.
var ErrUnreachable = errors.New("storage endpoint unreachable")

// unreachableCause names why a request never reached the service, or ""
// when err is not such a failure (the service answered, or the connection
// broke after it was made: those are transient and retried).
func unreachableCause(err error) string {
	var dns *net.DNSError
	if errors.As(err, &dns) {
		if dns.IsNotFound {
			return fmt.Sprintf("the host name %s does not resolve", dns.Name)
		}
		return fmt.Sprintf("the host name %s could not be resolved (%s)", dns.Name, dns.Err)
	}
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		return ""
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused (nothing listens there)"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "no route to the host"
	case op.Timeout():
		return "the connection timed out (no answer)"
	}
	return op.Err.Error()
}

// unreachableError is a request that never reached the service, with a
// message saying what to check. It keeps the network error in the chain,
// so the replication core still treats it as transient.
type unreachableError struct {
	msg   string
	cause error
}

// Error implements error.
func (e unreachableError) Error() string { return e.msg }

// Unwrap returns ErrUnreachable and the network error.
func (e unreachableError) Unwrap() []error { return []error{ErrUnreachable, e.cause} }

// unreachable builds the error for a request of what to the blob that
// never reached the service ("" cause: err is not one).
func (c *Client) unreachable(what string, err error) error {
	cause := unreachableCause(err)
	if cause == "" {
		return nil
	}
	check := "check the URL's host name, the network, DNS (a private endpoint needs its privatelink zone) and any firewall or proxy between this host and the storage account"
	if c.loc.IPStyle {
		check = "check that the storage service (for the emulator: bin/azurite-run) is running and listens at that address and port, and that the URL is right"
	}
	return unreachableError{
		msg: fmt.Sprintf("%s %s: %v: could not reach %s (%s): %s; if the endpoint moved, point the state directory at its new URL with `vhdsync set-blob`",
			what, c.loc.URL(), ErrUnreachable, c.loc.Host, cause, check),
		cause: RedactErr(err),
	}
}

// failFast keeps a client that has never had an answer from retrying a
// request that could not reach the service: the first command against a
// wrong or stopped endpoint then fails at once, not after the SDK's
// backoff (about 9 s, more with more retries). Once the service has
// answered, such errors are retried as before: they are then an outage,
// not a mistake.
type failFast struct{ answered atomic.Bool }

func newFailFast() *failFast { return &failFast{} }

// policy is the per-attempt pipeline stage.
func (f *failFast) policy() policy.Policy {
	return policyFunc(func(req *policy.Request) (*http.Response, error) {
		resp, err := req.Next()
		if err == nil {
			f.answered.Store(true)
			return resp, nil
		}
		if !f.answered.Load() && unreachableCause(err) != "" {
			return resp, nonRetriable{err}
		}
		return resp, err
	})
}

// nonRetriable marks an error the SDK's retry policy must not retry (it
// looks for a NonRetriable method).
type nonRetriable struct{ error }

// NonRetriable marks the error as final for the SDK's retry policy.
func (nonRetriable) NonRetriable() {}

// Unwrap returns the wrapped error.
func (e nonRetriable) Unwrap() error { return e.error }
