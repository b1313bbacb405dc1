package pageblob

import (
	"bytes"
	"context"
	"fmt"
	"hash/crc64"
	"io"
	"os"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/vhdsync/vhdsync/vhdlayer"
)

// MaxPutPage is the largest Put Page the service accepts (4 MiB). The
// emulator does not enforce it; this package does.
const MaxPutPage = 4 << 20

// crcTable is the CRC64 Azure Storage uses (polynomial 0x9A6C9329AC4BC9B5).
var crcTable = crc64.MakeTable(0x9A6C9329AC4BC9B5)

// CRC64 returns the Azure Storage CRC64 of p.
func CRC64(p []byte) uint64 { return crc64.Update(0, crcTable, p) }

// Options tune a Client. The zero value is ready to use.
type Options struct {
	// Transport replaces the HTTP client (tests count bytes with it).
	Transport policy.Transporter
	// PerCallPolicies run once per operation, before retries.
	PerCallPolicies []policy.Policy
	// MaxRetries is the SDK's own retry count for one call; 0 keeps the
	// SDK default, -1 disables SDK retries (the flusher retries itself).
	MaxRetries int32
	// TryTimeout bounds one HTTP attempt; 0 keeps the SDK default.
	TryTimeout time.Duration
	// Env looks up environment variables; nil means os.Getenv. Tests set it.
	Env func(string) string
}

// Client is one page blob with the credentials chosen for it.
type Client struct {
	loc  Location
	auth string
	pb   *pageblob.Client
	cc   *container.Client
	// snapshot is the snapshot this client reads (AtSnapshot), or "".
	snapshot string
	// bp paces the requests to the blob (shared with its snapshots'
	// clients: the service's limits are per blob).
	bp *backpressure
	// sas is the SAS the client signs with ("" for a key or Entra ID):
	// a server-side copy hands it on with the source URL.
	sas string
}

// Throttled counts the answers the service refused for its rate limits
// (503 ServerBusy, 500 OperationTimedOut, 429); each was sent again.
func (c *Client) Throttled() uint64 { return c.bp.throttled.Load() }

// InFlightLimit is the adaptive limit on requests in flight to the blob.
func (c *Client) InFlightLimit() int { return c.bp.InFlightLimit() }

// Open prepares a client for the blob at rawURL. It sends no request:
// errors here are about the URL or the credentials' format.
func Open(rawURL string, o *Options) (*Client, error) {
	if o == nil {
		o = &Options{}
	}
	env := o.Env
	if env == nil {
		env = os.Getenv
	}
	loc, err := ParseLocation(rawURL)
	if err != nil {
		return nil, err
	}
	bp := newBackpressure()
	copts := azcore.ClientOptions{Transport: o.Transport, PerCallPolicies: o.PerCallPolicies,
		PerRetryPolicies: []policy.Policy{bp.policy(), newFailFast().policy()}}
	copts.Retry.MaxRetries = o.MaxRetries
	copts.Retry.TryTimeout = o.TryTimeout
	// Never log request URLs or headers: they may carry a SAS.
	copts.Logging.AllowedQueryParams = nil
	popts := &pageblob.ClientOptions{ClientOptions: copts}
	ccopts := &container.ClientOptions{ClientOptions: copts}
	c := &Client{loc: loc, bp: bp}

	blobURL, contURL := loc.URL(), loc.ContainerURL()
	key, account := "", loc.Account
	switch {
	case loc.SAS != "":
		c.auth = "the SAS in the URL"
		c.sas = loc.SAS
		if c.pb, err = pageblob.NewClientWithNoCredential(withSAS(blobURL, loc.SAS), popts); err == nil {
			c.cc, err = container.NewClientWithNoCredential(withSAS(contURL, loc.SAS), ccopts)
		}
	case env("AZURE_STORAGE_CONNECTION_STRING") != "":
		cs, perr := parseConnectionString(env("AZURE_STORAGE_CONNECTION_STRING"))
		if perr != nil {
			return nil, perr
		}
		switch {
		case cs.sas != "":
			c.auth = "the SAS in AZURE_STORAGE_CONNECTION_STRING"
			c.sas = cs.sas
			if c.pb, err = pageblob.NewClientWithNoCredential(withSAS(blobURL, cs.sas), popts); err == nil {
				c.cc, err = container.NewClientWithNoCredential(withSAS(contURL, cs.sas), ccopts)
			}
		case cs.useDev:
			c.auth = "the emulator account from AZURE_STORAGE_CONNECTION_STRING"
			key, account = DevKey, DevAccount
		default:
			if cs.account != "" && !strings.EqualFold(cs.account, loc.Account) {
				return nil, fmt.Errorf("%w: AZURE_STORAGE_CONNECTION_STRING is for account %q but the URL names account %q", ErrAuth, cs.account, loc.Account)
			}
			c.auth = "the account key in AZURE_STORAGE_CONNECTION_STRING"
			key, account = cs.key, cs.account
		}
	case env("AZURE_STORAGE_KEY") != "":
		c.auth = "AZURE_STORAGE_KEY"
		key = env("AZURE_STORAGE_KEY")
	case loc.IsEmulator() && loc.Account == DevAccount:
		c.auth = "the emulator's development account"
		key = DevKey
	case loc.Scheme != "https":
		// Entra ID tokens are never sent over plain http (azcore refuses
		// them), so a plain-http URL without a key is an account nobody
		// recognised: say so, and what was tried, instead of failing in
		// the token policy.
		return nil, fmt.Errorf("%w: %s", ErrAuth, unrecognisedAccount(loc))
	default:
		c.auth = "Entra ID (azidentity default credential chain)"
		cred, cerr := azidentity.NewDefaultAzureCredential(nil)
		if cerr != nil {
			return nil, fmt.Errorf("%w: no credentials: put a SAS in the URL, or set AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY, or log in for Entra ID (az login, managed identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET): %v", ErrAuth, cerr)
		}
		if c.pb, err = pageblob.NewClient(blobURL, cred, popts); err == nil {
			c.cc, err = container.NewClient(contURL, cred, ccopts)
		}
	}
	if key != "" {
		cred, kerr := blob.NewSharedKeyCredential(account, key)
		if kerr != nil {
			return nil, fmt.Errorf("%w: the account key from %s is not valid base64: %v", ErrAuth, c.auth, kerr)
		}
		if c.pb, err = pageblob.NewClientWithSharedKeyCredential(blobURL, cred, popts); err == nil {
			c.cc, err = container.NewClientWithSharedKeyCredential(contURL, cred, ccopts)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %s", loc.URL(), describe(err))
	}
	return c, nil
}

// unrecognisedAccount says which credential sources were tried for an
// http URL none of them could sign.
func unrecognisedAccount(loc Location) string {
	hint := "check the account name in the URL"
	if loc.IsEmulator() {
		hint = fmt.Sprintf("the emulator's development account is %s: check the account name in the URL (http://HOST:PORT/%s/CONTAINER/BLOB), or give that account's key", DevAccount, DevAccount)
	}
	return fmt.Sprintf("no credentials for account %q at %s: the account was not recognised. Tried, in order: a SAS in the URL (none); AZURE_STORAGE_CONNECTION_STRING (not set); AZURE_STORAGE_KEY (not set); the emulator's development account (only for %s at a loopback address); Entra ID (not over http: it needs an https URL). %s",
		loc.Account, loc.Host, DevAccount, hint)
}

// Location returns the parsed URL.
func (c *Client) Location() Location { return c.loc }

// AuthMethod says which credential source Open chose (never the secret).
func (c *Client) AuthMethod() string { return c.auth }

type connString struct {
	account, key, sas string
	useDev            bool
}

func parseConnectionString(s string) (connString, error) {
	var cs connString
	for _, kv := range strings.Split(s, ";") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			continue
		}
		switch strings.ToLower(k) {
		case "accountname":
			cs.account = v
		case "accountkey":
			cs.key = v
		case "sharedaccesssignature":
			cs.sas = strings.TrimPrefix(v, "?")
		case "usedevelopmentstorage":
			cs.useDev = strings.EqualFold(v, "true")
		}
	}
	if cs.sas == "" && !cs.useDev && (cs.account == "" || cs.key == "") {
		return cs, fmt.Errorf("%w: AZURE_STORAGE_CONNECTION_STRING has neither AccountName+AccountKey nor SharedAccessSignature", ErrAuth)
	}
	return cs, nil
}

// CreateOptions control Create.
type CreateOptions struct {
	// Overwrite replaces an existing blob; otherwise an existing blob is
	// an ErrBlobExists error and stays untouched.
	Overwrite bool
	// CreateContainer creates the container when it is missing.
	CreateContainer bool
	// Metadata is stored on the blob.
	Metadata map[string]string
}

// Create makes a page blob of virtualSize+512 bytes whose last 512 bytes
// are footer. The blob is created with If-None-Match: * unless Overwrite,
// so an existing blob is never touched. If writing the footer fails, the
// new blob is deleted again so that no blob without a footer is left.
func (c *Client) Create(ctx context.Context, virtualSize uint64, footer [vhdlayer.FooterSize]byte, o CreateOptions) error {
	if o.CreateContainer {
		if _, err := c.cc.Create(ctx, nil); err != nil {
			if code, _ := serviceCode(err); code != bloberror.ContainerAlreadyExists {
				return c.classify("create container", err)
			}
		}
	}
	md := map[string]*string{}
	for k, v := range o.Metadata {
		md[k] = to.Ptr(v)
	}
	opts := &pageblob.CreateOptions{SequenceNumber: to.Ptr(int64(0)), Metadata: md}
	if !o.Overwrite {
		etagAny := azcore.ETagAny
		opts.AccessConditions = &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: &etagAny}}
	}
	blobLen := int64(virtualSize) + vhdlayer.FooterSize
	if _, err := c.pb.Create(ctx, blobLen, opts); err != nil {
		if code, status := serviceCode(err); !o.Overwrite && (code == bloberror.BlobAlreadyExists || status == 409 || code == bloberror.ConditionNotMet) {
			return c.classify("create blob", fmt.Errorf("%w", err))
		}
		return c.classify("create blob", err)
	}
	if err := c.PutPages(ctx, int64(virtualSize), footer[:], ""); err != nil {
		_, derr := c.pb.Delete(context.WithoutCancel(ctx), nil)
		if derr != nil {
			return fmt.Errorf("write footer: %w (and deleting the incomplete blob failed: %s; delete it by hand or rerun with --overwrite)", err, describe(derr))
		}
		return fmt.Errorf("write footer: %w (the incomplete blob was deleted)", err)
	}
	return nil
}

// PutPages writes data (a multiple of 512 bytes, at most MaxPutPage) at
// off, with a CRC64 computed here so the service checks what we meant to
// send. leaseID may be empty for an unleased blob.
func (c *Client) PutPages(ctx context.Context, off int64, data []byte, leaseID string) error {
	return c.putPages(ctx, off, data, leaseID, CRC64(data))
}

// putPages sends data with the given CRC64; tests pass a wrong one.
func (c *Client) putPages(ctx context.Context, off int64, data []byte, leaseID string, crc uint64) error {
	if off%vhdlayer.SectorSize != 0 || len(data)%vhdlayer.SectorSize != 0 || len(data) == 0 {
		return fmt.Errorf("put page %d+%d: not 512-byte aligned", off, len(data))
	}
	if len(data) > MaxPutPage {
		return fmt.Errorf("put page %d+%d: larger than the 4 MiB Put Page limit", off, len(data))
	}
	opts := &pageblob.UploadPagesOptions{TransactionalValidation: blob.TransferValidationTypeCRC64(crc)}
	if leaseID != "" {
		opts.AccessConditions = &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: &leaseID}}
	}
	_, err := c.pb.UploadPages(ctx, nopCloser{bytes.NewReader(data)}, blob.HTTPRange{Offset: off, Count: int64(len(data))}, opts)
	if err != nil {
		return c.classify(fmt.Sprintf("put page %d-%d", off, off+int64(len(data))-1), err)
	}
	return nil
}

type nopCloser struct{ io.ReadSeeker }

// Close does nothing: the body is a bytes.Reader.
func (nopCloser) Close() error { return nil }

// Properties are the blob facts vhdsync checks.
type Properties struct {
	Length         int64
	BlobType       string
	SequenceNumber int64
	LeaseState     string
	LeaseStatus    string
	ETag           string
	LastModified   time.Time
	Metadata       map[string]string
}

// Properties reads the blob's properties. A missing blob is told apart
// from a missing container.
func (c *Client) Properties(ctx context.Context) (Properties, error) {
	r, err := c.pb.GetProperties(ctx, nil)
	if err != nil {
		if _, status := serviceCode(err); status == 404 && c.snapshot != "" {
			return Properties{}, fmt.Errorf("read snapshot %s of %s: %w; list the blob's snapshots with `vhdsync points --blob URL`", c.snapshot, c.loc.URL(), ErrSnapshotNotFound)
		}
		if _, status := serviceCode(err); status == 404 {
			if _, cerr := c.cc.GetProperties(ctx, nil); cerr != nil {
				if code, st := serviceCode(cerr); st == 404 || code == bloberror.ContainerNotFound {
					return Properties{}, fmt.Errorf("read blob properties %s: %w: container %q does not exist; create it, or pass --create-container", c.loc.URL(), ErrContainerNotFound, c.loc.Container)
				}
			}
			return Properties{}, fmt.Errorf("read blob properties %s: %w; create it with `vhdsync create`, or check the URL", c.loc.URL(), ErrBlobNotFound)
		}
		return Properties{}, c.classify("read blob properties", err)
	}
	p := Properties{Metadata: map[string]string{}}
	if r.ContentLength != nil {
		p.Length = *r.ContentLength
	}
	if r.BlobType != nil {
		p.BlobType = string(*r.BlobType)
	}
	if r.BlobSequenceNumber != nil {
		p.SequenceNumber = *r.BlobSequenceNumber
	}
	if r.LeaseState != nil {
		p.LeaseState = string(*r.LeaseState)
	}
	if r.LeaseStatus != nil {
		p.LeaseStatus = string(*r.LeaseStatus)
	}
	if r.ETag != nil {
		p.ETag = string(*r.ETag)
	}
	if r.LastModified != nil {
		p.LastModified = *r.LastModified
	}
	for k, v := range r.Metadata {
		if v != nil {
			p.Metadata[strings.ToLower(k)] = *v
		}
	}
	return p, nil
}

// ReadAt reads len(p) bytes of the blob at off.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	n, err := c.pb.DownloadBuffer(ctx, p, &blob.DownloadBufferOptions{Range: blob.HTTPRange{Offset: off, Count: int64(len(p))}})
	if err != nil {
		return c.classify(fmt.Sprintf("read %d-%d", off, off+int64(len(p))-1), err)
	}
	if n != int64(len(p)) {
		return fmt.Errorf("read %d-%d of %s: got %d bytes", off, off+int64(len(p))-1, c.loc.URL(), n)
	}
	return nil
}

// VHDInfo is what OpenVHD found.
type VHDInfo struct {
	Props  Properties
	Footer vhdlayer.Footer
	Raw    [vhdlayer.FooterSize]byte
}

// ReadFooter reads the blob's properties and its last 512 bytes, without
// judging them. Inspect uses it to show even a broken footer.
func (c *Client) ReadFooter(ctx context.Context) (Properties, [vhdlayer.FooterSize]byte, error) {
	var raw [vhdlayer.FooterSize]byte
	p, err := c.Properties(ctx)
	if err != nil {
		return p, raw, err
	}
	if !strings.EqualFold(p.BlobType, "PageBlob") {
		return p, raw, fmt.Errorf("open %s: %w (it is a %s); a VHD for Azure must be a page blob", c.loc.URL(), ErrNotPageBlob, p.BlobType)
	}
	if p.Length < vhdlayer.FooterSize {
		return p, raw, fmt.Errorf("open %s: %w: the blob is %d bytes, too short to hold a footer", c.loc.URL(), ErrNotFixedVHD, p.Length)
	}
	if err := c.ReadAt(ctx, raw[:], p.Length-vhdlayer.FooterSize); err != nil {
		return p, raw, err
	}
	return p, raw, nil
}

// OpenVHD checks that the blob exists, is a page blob and ends in a valid
// fixed-VHD footer matching its length, and returns what it found.
func (c *Client) OpenVHD(ctx context.Context) (VHDInfo, error) {
	p, raw, err := c.ReadFooter(ctx)
	if err != nil {
		return VHDInfo{Props: p}, err
	}
	info := VHDInfo{Props: p, Raw: raw}
	f, err := vhdlayer.DecodeFooter(raw[:])
	if err != nil {
		return info, fmt.Errorf("open %s: %w: %w", c.loc.URL(), ErrNotFixedVHD, err)
	}
	info.Footer = f
	if err := vhdlayer.Validate(f, p.Length); err != nil {
		return info, fmt.Errorf("open %s: %w: %w", c.loc.URL(), ErrNotFixedVHD, err)
	}
	return info, nil
}

// Delete removes the blob (tests and --overwrite clean-up).
func (c *Client) Delete(ctx context.Context) error {
	_, err := c.pb.Delete(ctx, nil)
	return c.classify("delete blob", err)
}

// writeConds builds the lease and sequence-number conditions of a write.
func writeConds(leaseID string, ifSeqEq *int64) (*blob.AccessConditions, *pageblob.SequenceNumberAccessConditions) {
	var ac *blob.AccessConditions
	if leaseID != "" {
		ac = &blob.AccessConditions{LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: &leaseID}}
	}
	var sc *pageblob.SequenceNumberAccessConditions
	if ifSeqEq != nil {
		v := *ifSeqEq
		sc = &pageblob.SequenceNumberAccessConditions{IfSequenceNumberEqualTo: &v}
	}
	return ac, sc
}

// PutPagesCond is PutPages with the lease and, if ifSeqEq is set, the
// condition that the blob's sequence number equals *ifSeqEq.
func (c *Client) PutPagesCond(ctx context.Context, off int64, data []byte, leaseID string, ifSeqEq *int64) error {
	return c.PutPagesVec(ctx, off, [][]byte{data}, leaseID, ifSeqEq)
}

// PutPagesVec is PutPagesCond with the payload given as buffers sent back
// to back (no copy joins them). They must never change afterwards: net/http
// may still be reading a request body after a failed call has returned.
func (c *Client) PutPagesVec(ctx context.Context, off int64, bufs [][]byte, leaseID string, ifSeqEq *int64) error {
	body := newVecReader(bufs)
	n := body.size
	if off%vhdlayer.SectorSize != 0 || n%vhdlayer.SectorSize != 0 || n == 0 {
		return fmt.Errorf("put page %d+%d: not 512-byte aligned", off, n)
	}
	if n > MaxPutPage {
		return fmt.Errorf("put page %d+%d: larger than the 4 MiB Put Page limit", off, n)
	}
	var crc uint64
	for _, b := range bufs {
		crc = crc64.Update(crc, crcTable, b)
	}
	ac, sc := writeConds(leaseID, ifSeqEq)
	opts := &pageblob.UploadPagesOptions{
		TransactionalValidation:        blob.TransferValidationTypeCRC64(crc),
		AccessConditions:               ac,
		SequenceNumberAccessConditions: sc,
	}
	_, err := c.pb.UploadPages(ctx, body, blob.HTTPRange{Offset: off, Count: n}, opts)
	if err != nil {
		return c.wrapWrite(fmt.Sprintf("put page %d-%d", off, off+n-1), err)
	}
	return nil
}

// ClearPages zeroes [off, off+length) with the same conditions.
func (c *Client) ClearPages(ctx context.Context, off, length int64, leaseID string, ifSeqEq *int64) error {
	if off%vhdlayer.SectorSize != 0 || length%vhdlayer.SectorSize != 0 || length <= 0 {
		return fmt.Errorf("clear pages %d+%d: not 512-byte aligned", off, length)
	}
	ac, sc := writeConds(leaseID, ifSeqEq)
	_, err := c.pb.ClearPages(ctx, blob.HTTPRange{Offset: off, Count: length}, &pageblob.ClearPagesOptions{
		AccessConditions: ac, SequenceNumberAccessConditions: sc,
	})
	if err != nil {
		return c.wrapWrite(fmt.Sprintf("clear pages %d-%d", off, off+length-1), err)
	}
	return nil
}

// wrapWrite classifies a refused write but keeps the service error in the
// chain, so the flusher can tell transient failures from final ones.
func (c *Client) wrapWrite(what string, err error) error {
	if ue := c.unreachable(what, err); ue != nil {
		return ue
	}
	code, status := serviceCode(err)
	err = RedactErr(err)
	if status == 0 || status == 408 || status == 429 || status >= 500 {
		return fmt.Errorf("%s %s: %w", what, c.loc.URL(), err)
	}
	if code == bloberror.SequenceNumberConditionNotMet {
		return fmt.Errorf("%s %s: %w: %w", what, c.loc.URL(), ErrConditionNotMet, err)
	}
	return fmt.Errorf("%w (%w)", c.classify(what, err), err)
}

// RaiseSequence sets the sequence number to max(current, n).
func (c *Client) RaiseSequence(ctx context.Context, n int64, leaseID string) error {
	ac, _ := writeConds(leaseID, nil)
	act := pageblob.SequenceNumberActionTypeMax
	_, err := c.pb.UpdateSequenceNumber(ctx, &pageblob.UpdateSequenceNumberOptions{
		ActionType: &act, SequenceNumber: &n, AccessConditions: ac,
	})
	if err != nil {
		return c.wrapWrite(fmt.Sprintf("set sequence number %d", n), err)
	}
	return nil
}

// Resize sets the blob's length to size bytes (Set Blob Properties with
// x-ms-blob-content-length): added pages read as zeros, pages beyond size
// are dropped. leaseID is carried as every write carries it.
func (c *Client) Resize(ctx context.Context, size int64, leaseID string) error {
	if size%vhdlayer.SectorSize != 0 || size < 0 {
		return fmt.Errorf("resize %s to %d bytes: not a multiple of 512", c.loc.URL(), size)
	}
	ac, _ := writeConds(leaseID, nil)
	if _, err := c.pb.Resize(ctx, size, &pageblob.ResizeOptions{AccessConditions: ac}); err != nil {
		return c.wrapWrite(fmt.Sprintf("resize to %d bytes", size), err)
	}
	return nil
}

// Sequence reads the blob's sequence number.
func (c *Client) Sequence(ctx context.Context) (int64, error) {
	p, err := c.Properties(ctx)
	if err != nil {
		return 0, err
	}
	return p.SequenceNumber, nil
}

// AcquireLease takes an infinite lease with proposedID.
func (c *Client) AcquireLease(ctx context.Context, proposedID string) (string, error) {
	lc, err := lease.NewBlobClient(c.pb, &lease.BlobClientOptions{LeaseID: &proposedID})
	if err != nil {
		return "", fmt.Errorf("lease %s: %w", c.loc.URL(), err)
	}
	r, err := lc.AcquireLease(ctx, -1, nil)
	if err != nil {
		code, status := serviceCode(err)
		if code == bloberror.LeaseAlreadyPresent || status == 409 {
			return "", fmt.Errorf("acquire lease on %s: %w: another vhdsync mount, import or apply worker holds the blob; stop that writer first, or pass --break-lease if you are sure it is gone (its unsent writes are then lost to the blob)", c.loc.URL(), ErrLeased)
		}
		return "", c.wrapWrite("acquire lease", err)
	}
	if r.LeaseID == nil {
		return proposedID, nil
	}
	return *r.LeaseID, nil
}

// BreakLease breaks any lease on the blob immediately.
func (c *Client) BreakLease(ctx context.Context) error {
	lc, err := lease.NewBlobClient(c.pb, nil)
	if err != nil {
		return fmt.Errorf("lease %s: %w", c.loc.URL(), err)
	}
	var zero int32
	if _, err := lc.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		if code, _ := serviceCode(err); code == bloberror.LeaseNotPresentWithLeaseOperation {
			return nil
		}
		return c.wrapWrite("break lease", err)
	}
	return nil
}

// ReleaseLease releases the lease id.
func (c *Client) ReleaseLease(ctx context.Context, id string) error {
	lc, err := lease.NewBlobClient(c.pb, &lease.BlobClientOptions{LeaseID: &id})
	if err != nil {
		return fmt.Errorf("lease %s: %w", c.loc.URL(), err)
	}
	if _, err := lc.ReleaseLease(ctx, nil); err != nil {
		return c.wrapWrite("release lease", err)
	}
	return nil
}

// Range is a byte range [Off, Off+Len) of the blob.
type Range struct{ Off, Len int64 }

// PageRanges lists the blob's valid (written, not cleared) page ranges in
// [off, off+n); n == 0 means to the end of the blob.
func (c *Client) PageRanges(ctx context.Context, off, n int64) ([]Range, error) {
	pager := c.pb.NewGetPageRangesPager(&pageblob.GetPageRangesOptions{Range: blob.HTTPRange{Offset: off, Count: n}})
	var out []Range
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, c.classify("list page ranges", err)
		}
		for _, r := range page.PageRange {
			if r.Start == nil || r.End == nil {
				continue
			}
			out = append(out, Range{Off: *r.Start, Len: *r.End - *r.Start + 1})
		}
	}
	return out, nil
}
