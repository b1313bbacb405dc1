package pageblob

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
)

// Error classes. Every error this package returns for a refused request
// wraps exactly one of them, so callers (and the exit-code table) can tell
// the causes apart with errors.Is.
var (
	ErrBadURL            = errors.New("invalid blob URL")
	ErrAuth              = errors.New("authentication failed")
	ErrContainerNotFound = errors.New("container not found")
	ErrBlobNotFound      = errors.New("blob not found")
	ErrBlobExists        = errors.New("blob already exists")
	ErrNotPageBlob       = errors.New("blob is not a page blob")
	ErrNotFixedVHD       = errors.New("blob is not a fixed VHD")
	ErrLeased            = errors.New("blob is leased by another writer")
	ErrConditionNotMet   = errors.New("sequence number condition not met")
)

// serviceCode returns the storage error code of err, or "".
func serviceCode(err error) (bloberror.Code, int) {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return bloberror.Code(re.ErrorCode), re.StatusCode
	}
	return "", 0
}

// classify wraps a service error in the matching class with a message that
// says what to do. what names the operation ("create blob", "read footer").
func (c *Client) classify(what string, err error) error {
	if err == nil {
		return nil
	}
	if ue := c.unreachable(what, err); ue != nil {
		return ue
	}
	code, status := serviceCode(err)
	u := c.loc.URL()
	if status == 0 && strings.HasPrefix(c.auth, "Entra") && strings.Contains(err.Error(), "DefaultAzureCredential") {
		// azidentity's chain found no identity (its errors all start so).
		return fmt.Errorf("%s %s: %w: no credential worked. Tried, in order: a SAS in the URL (none); AZURE_STORAGE_CONNECTION_STRING (not set); AZURE_STORAGE_KEY (not set); Entra ID: %s. Give a SAS or a key, or log in for Entra ID (az login, a managed identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET)",
			what, u, ErrAuth, oneLine(err.Error(), 600))
	}
	switch {
	case code == bloberror.AuthenticationFailed || code == bloberror.AuthorizationFailure ||
		code == bloberror.AuthorizationPermissionMismatch || code == bloberror.AuthorizationResourceTypeMismatch ||
		code == bloberror.AuthorizationProtocolMismatch || code == bloberror.AuthorizationSourceIPMismatch ||
		status == http.StatusForbidden || status == http.StatusUnauthorized:
		return fmt.Errorf("%s %s: %w using %s (%s): check the credentials: a SAS in the URL with read, write and create rights that has not expired, AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY for account %q, or an Entra ID login with the Storage Blob Data Contributor role",
			what, u, ErrAuth, c.auth, shortCode(code, status), c.loc.Account)
	case code == bloberror.ContainerNotFound:
		return fmt.Errorf("%s %s: %w: container %q does not exist; create it, or pass --create-container", what, u, ErrContainerNotFound, c.loc.Container)
	case code == bloberror.BlobNotFound:
		return fmt.Errorf("%s %s: %w; create it with `vhdsync create`, or check the URL", what, u, ErrBlobNotFound)
	case code == bloberror.BlobAlreadyExists || (status == http.StatusConflict && code == "") || code == bloberror.ConditionNotMet && strings.Contains(what, "create"):
		return fmt.Errorf("%s %s: %w; it was left untouched. Pass --overwrite to replace it (its data is lost), or choose another name", what, u, ErrBlobExists)
	case code == bloberror.InvalidBlobType:
		return fmt.Errorf("%s %s: %w (it is a block or append blob); a VHD for Azure must be a page blob, so choose another name", what, u, ErrNotPageBlob)
	case code == bloberror.LeaseIDMissing || code == bloberror.LeaseAlreadyPresent ||
		code == bloberror.LeaseIDMismatchWithBlobOperation || code == bloberror.LeaseIDMismatchWithLeaseOperation:
		return fmt.Errorf("%s %s: %w (%s): another vhdsync mount, import or apply worker holds it; stop that writer, or break the lease with --break-lease if you are sure it is gone", what, u, ErrLeased, code)
	case code == bloberror.SequenceNumberConditionNotMet:
		return fmt.Errorf("%s %s: %w: %v", what, u, ErrConditionNotMet, err)
	case status == http.StatusNotFound:
		return fmt.Errorf("%s %s: %w (HTTP 404); check the URL", what, u, ErrBlobNotFound)
	}
	return fmt.Errorf("%s %s: %s", what, u, describe(err))
}

// oneLine joins a multi-line message into one line of at most n bytes,
// without any SAS signature.
func oneLine(msg string, n int) string {
	fields := strings.FieldsFunc(msg, func(r rune) bool { return r == '\n' || r == '\t' })
	msg = redactText(strings.Join(fields, "; "))
	if len(msg) > n {
		msg = msg[:n] + "..."
	}
	return msg
}

func shortCode(code bloberror.Code, status int) string {
	if code != "" {
		return fmt.Sprintf("HTTP %d %s", status, code)
	}
	return fmt.Sprintf("HTTP %d", status)
}

// describe shortens an azcore error to its first line: the full text
// repeats the request URL, which may hold a SAS.
func describe(err error) string {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return fmt.Sprintf("HTTP %d %s", re.StatusCode, re.ErrorCode)
	}
	msg := err.Error()
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	return redactText(msg)
}

// sigParam matches a SAS signature anywhere in a text, such as an error
// that quotes a request URL.
var sigParam = regexp.MustCompile(`(?i)([?&]sig=)[^&"'\s]*`)

// redactText replaces every SAS signature in s. Redact cannot do it for an
// error message: the HTTP client's *url.Error quotes the whole request URL,
// query and all, inside its text.
func redactText(s string) string { return sigParam.ReplaceAllString(s, "${1}REDACTED") }

// redacted keeps err in the chain, so errors.Is and errors.As (IsTransient)
// still see the cause, but prints it without SAS signatures.
type redacted struct{ err error }

// Error implements error.
func (r redacted) Error() string { return redactText(r.err.Error()) }

// Unwrap returns the wrapped error(s).
func (r redacted) Unwrap() error { return r.err }

// RedactErr wraps err so that its text never shows a SAS signature, while
// errors.As still finds the service's response error inside. A service
// answer is classified for the replication core (remote.IsTransient,
// remote.IsThrottled) here, at the edge, so the core never sees the SDK.
func RedactErr(err error) error {
	if err == nil {
		return nil
	}
	if code, status := serviceCode(err); status != 0 {
		return serviceError{redacted{err}, code, status}
	}
	return redacted{err}
}

// serviceError is a request the service answered with an error status.
type serviceError struct {
	redacted
	code   bloberror.Code
	status int
}

// Transient reports whether a retry can help: timeouts, throttling and
// server errors.
func (e serviceError) Transient() bool {
	switch e.status {
	case 408, 429, 500, 502, 503, 504:
		return true
	}
	return false
}

// Throttled reports whether the service refused the request for its rate
// limits: 503 ServerBusy (over a blob's or account's request or byte
// target), 500 OperationTimedOut (the same, answered late), 429.
func (e serviceError) Throttled() bool {
	return e.status == 429 || e.code == bloberror.ServerBusy || e.code == bloberror.OperationTimedOut ||
		(e.status == 503 && e.code == "")
}
