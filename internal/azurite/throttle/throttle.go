// Package throttle puts Azure's per-blob scalability limits in front of
// Azurite: a reverse proxy that answers 503 ServerBusy (and, if asked,
// 500 OperationTimedOut) once one blob gets more requests or bytes per second
// than a standard page blob is allowed, so that tests and benchmarks see the
// throttling storms real Azure produces and the emulator never does.
//
// The limits are token buckets per blob with a one-second burst. A request
// is admitted while the blob has a request token and its byte bucket is
// above zero; the request's bytes are then taken from the byte bucket even
// if that drives it below zero. The debt is what lets a 4 MiB Put Page
// through a bucket smaller than 4 MiB: refusing it until the bucket could
// hold it whole would refuse it forever, and Azure does not do that either.
//
// SetLimits changes the limits of a running proxy, so that a test can
// start a storm (limits far below its load) and end it (Limits{}).
//
// The package uses the standard library only, so that it shares no code
// with the client it tests.
package throttle

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Limits are the per-blob scalability targets the proxy enforces. A zero
// field means that dimension is unlimited.
type Limits struct {
	// RequestsPerSecond is the sustained request rate one blob accepts;
	// the burst is one second's worth.
	RequestsPerSecond float64
	// BytesPerSecond is the sustained throughput of one blob, request
	// bodies and response bodies together; the burst is one second's worth.
	BytesPerSecond float64
	// TimeoutFraction is the share (0 to 1) of refusals answered with
	// 500 OperationTimedOut instead of 503 ServerBusy. Azure answers a
	// busy partition both ways, and clients must retry both.
	TimeoutFraction float64
}

// StandardPageBlob returns the published targets of one page blob in a
// standard storage account: 500 requests/s and 60 MiB/s, never timing out.
func StandardPageBlob() Limits {
	return Limits{RequestsPerSecond: 500, BytesPerSecond: 60 << 20}
}

// Counts are one set of counters of the proxy's answers.
type Counts struct {
	// Admitted is the number of requests forwarded to the target.
	Admitted int64 `json:"admitted"`
	// Throttled is the number of 503 ServerBusy refusals.
	Throttled int64 `json:"throttled"`
	// TimedOut is the number of 500 OperationTimedOut refusals.
	TimedOut int64 `json:"timed_out"`
	// Bytes is the number of bytes charged to admitted requests: request
	// bodies plus, for reads, the range asked for or else the body sent.
	Bytes int64 `json:"bytes"`
}

// Stats are the proxy's counters since it was built.
type Stats struct {
	// Total counts every request, including the container- and
	// account-level ones that are never limited.
	Total Counts `json:"total"`
	// Blobs counts each blob's requests, keyed by URL path
	// (/account/container/blob).
	Blobs map[string]Counts `json:"blobs"`
}

// Option changes how New builds a Proxy.
type Option func(*Proxy)

// WithClock makes the proxy read time from now instead of time.Now, so that
// tests can fill and drain the buckets deterministically.
func WithClock(now func() time.Time) Option {
	return func(p *Proxy) { p.now = now }
}

// WithWireLog writes one JSON line per request to w. The lines never hold a
// query string (it may be a SAS) or any header but the range.
func WithWireLog(w io.Writer) Option {
	return func(p *Proxy) { p.wire = w }
}

// WithTransport replaces the transport that carries admitted requests to
// the target.
func WithTransport(rt http.RoundTripper) Option {
	return func(p *Proxy) { p.rp.Transport = rt }
}

// WithDelay adds d to every request's round trip, before it is admitted:
// a remote farther away (a region's round trip), for measuring what
// latency costs the synchronous barriers.
func WithDelay(d time.Duration) Option {
	return func(p *Proxy) { p.delay = d }
}

// Proxy is an http.Handler that forwards requests to an Azurite endpoint
// unless the blob they address is over its limits.
type Proxy struct {
	target *url.URL
	// prefix is the target's path ("/devstoreaccount1" for a path-style
	// endpoint): the account segment that precedes container and blob.
	prefix string
	lim    Limits
	rp     *httputil.ReverseProxy
	now    func() time.Time
	delay  time.Duration

	wireMu sync.Mutex
	wire   io.Writer

	mu      sync.Mutex
	buckets map[string]*bucket
	stats   Stats
	// timeoutDebt accumulates TimeoutFraction per refusal; each time it
	// reaches 1 a refusal becomes a timeout. Spreading them evenly, rather
	// than drawing at random, gives tests an exact, repeatable share.
	timeoutDebt float64
}

// bucket is one blob's pair of token buckets.
type bucket struct {
	reqs, bytes float64
	last        time.Time
}

// New builds a proxy in front of target, the Azurite endpoint such as
// http://127.0.0.1:41234/devstoreaccount1. Request paths are forwarded
// unchanged, so clients address the proxy exactly as they would Azurite:
// http://PROXY/devstoreaccount1/container/blob.
func New(target string, lim Limits, opts ...Option) (*Proxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("throttle: target %q: %w", target, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("throttle: target %q: want http://HOST:PORT/ACCOUNT", target)
	}
	if u.RawQuery != "" {
		return nil, fmt.Errorf("throttle: target %q: the endpoint takes no query (pass a SAS to the client, not to the proxy)", u.Scheme+"://"+u.Host+u.Path)
	}
	if err := lim.check(); err != nil {
		return nil, err
	}
	p := &Proxy{
		target:  u,
		prefix:  strings.TrimRight(u.Path, "/"),
		lim:     lim,
		now:     time.Now,
		buckets: map[string]*bucket{},
		stats:   Stats{Blobs: map[string]Counts{}},
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// The default keeps two idle connections per host; a storm of
	// concurrent Put Pages would then open and close a connection to
	// Azurite per request and fill the port range with TIME_WAIT.
	tr.MaxIdleConnsPerHost = 256
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			// Only scheme and host change. The path and query go on as
			// they came: SharedKey signs /account/container/blob and the
			// query, not the host, so Azurite accepts what the client
			// signed for the proxy's address.
			r.Out.URL.Scheme = u.Scheme
			r.Out.URL.Host = u.Host
			r.Out.Host = ""
		},
		Transport: tr,
		// The default handler logs every client that hangs up; a
		// benchmark cancelling requests would flood stderr.
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, _ error) {
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p, nil
}

// Endpoint returns the URL a client uses to reach the target through the
// proxy listening on hostport, in the target's form:
// http://HOSTPORT/devstoreaccount1.
func (p *Proxy) Endpoint(hostport string) string {
	return "http://" + hostport + p.prefix
}

// CloseIdleConnections closes the proxy's idle connections to the target,
// when the transport is its own or has such a method.
func (p *Proxy) CloseIdleConnections() {
	if c, ok := p.rp.Transport.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// check refuses limits the buckets cannot enforce.
func (lim Limits) check() error {
	if lim.RequestsPerSecond < 0 || lim.BytesPerSecond < 0 || lim.TimeoutFraction < 0 || lim.TimeoutFraction > 1 {
		return fmt.Errorf("throttle: limits %+v: rates must be >= 0 and the timeout fraction within [0, 1]", lim)
	}
	return nil
}

// Limits returns the limits the proxy enforces.
func (p *Proxy) Limits() Limits {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lim
}

// SetLimits replaces the limits the proxy enforces from the next request
// on: a test starts a throttling storm by lowering them and ends it by
// lifting them (Limits{}: unlimited). Every blob starts again with a full
// one-second burst of the new limits, as under New, and the share of
// timeouts starts afresh; the counters go on.
func (p *Proxy) SetLimits(lim Limits) error {
	if err := lim.check(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lim = lim
	p.buckets = map[string]*bucket{}
	p.timeoutDebt = 0
	return nil
}

// blobKey returns the path of the blob r addresses, or "" for a service-
// or container-level request (which Azure limits per account, not here).
func (p *Proxy) blobKey(path string) string {
	rest := path
	if p.prefix != "" {
		// A path-style endpoint: the first segment is the account,
		// whichever account the client names.
		rest = strings.TrimPrefix(rest, "/")
		_, rest, _ = strings.Cut(rest, "/")
	}
	rest = strings.TrimPrefix(rest, "/")
	container, blob, _ := strings.Cut(rest, "/")
	if container == "" || blob == "" {
		return ""
	}
	return path
}

// verdict is what admit decided for one request.
type verdict int

const (
	admitted verdict = iota
	overOps
	overBytes
)

// refill tops up b for the time elapsed since it was last seen. Both
// buckets hold at most one second's worth (the burst).
func (p *Proxy) refill(b *bucket, now time.Time) {
	dt := now.Sub(b.last).Seconds()
	if dt <= 0 {
		// A clock that went backwards refills nothing.
		return
	}
	b.last = now
	if r := p.lim.RequestsPerSecond; r > 0 {
		b.reqs = min(b.reqs+dt*r, r)
	}
	if r := p.lim.BytesPerSecond; r > 0 {
		b.bytes = min(b.bytes+dt*r, r)
	}
}

// admit decides whether a request for key may go on, charging n bytes to
// it if so.
func (p *Proxy) admit(key string, n int64, now time.Time) verdict {
	if key == "" {
		return admitted
	}
	b := p.buckets[key]
	if b == nil {
		b = &bucket{reqs: p.lim.RequestsPerSecond, bytes: p.lim.BytesPerSecond, last: now}
		p.buckets[key] = b
	}
	p.refill(b, now)
	if p.lim.RequestsPerSecond > 0 && b.reqs < 1 {
		return overOps
	}
	if p.lim.BytesPerSecond > 0 && b.bytes <= 0 {
		return overBytes
	}
	if p.lim.RequestsPerSecond > 0 {
		b.reqs--
	}
	if p.lim.BytesPerSecond > 0 {
		b.bytes -= float64(n)
	}
	return admitted
}

// charge takes n more bytes from key's byte bucket: the bytes known only
// once the request is done (a response body, a body of unknown length).
func (p *Proxy) charge(key string, n int64) {
	if key == "" || n == 0 || p.lim.BytesPerSecond == 0 {
		return
	}
	if b := p.buckets[key]; b != nil {
		b.bytes -= float64(n)
	}
}

// count adds c to the totals and, for a blob, to its own counters.
func (p *Proxy) count(key string, c Counts) {
	add := func(t *Counts) {
		t.Admitted += c.Admitted
		t.Throttled += c.Throttled
		t.TimedOut += c.TimedOut
		t.Bytes += c.Bytes
	}
	add(&p.stats.Total)
	if key != "" {
		b := p.stats.Blobs[key]
		add(&b)
		p.stats.Blobs[key] = b
	}
}

// Stats returns a copy of the counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Stats{Total: p.stats.Total, Blobs: make(map[string]Counts, len(p.stats.Blobs))}
	for k, v := range p.stats.Blobs {
		s.Blobs[k] = v
	}
	return s
}

// rangeLen returns the length of the x-ms-range or Range header
// ("bytes=START-END"), x-ms-range first as Azure reads it, or false when
// neither gives a closed range.
func rangeLen(h http.Header) (int64, bool) {
	v := h.Get("x-ms-range")
	if v == "" {
		v = h.Get("Range")
	}
	spec, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes=")
	if !ok {
		return 0, false
	}
	a, b, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, false
	}
	start, err1 := strconv.ParseInt(strings.TrimSpace(a), 10, 64)
	end, err2 := strconv.ParseInt(strings.TrimSpace(b), 10, 64)
	if err1 != nil || err2 != nil || end < start {
		return 0, false
	}
	return end - start + 1, true
}

// ServeHTTP forwards r to the target, or refuses it as Azure does when the
// blob it addresses is over its limits.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p.delay > 0 {
		t := time.NewTimer(p.delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	start := p.now()
	key := p.blobKey(r.URL.Path)
	// Bytes known before forwarding are charged at admission; the rest
	// once the answer is sent.
	var reqBytes int64
	if r.ContentLength > 0 {
		reqBytes = r.ContentLength
	}
	known := reqBytes
	rng, ranged := int64(0), false
	if r.Method == http.MethodGet {
		if rng, ranged = rangeLen(r.Header); ranged {
			known += rng
		}
	}

	p.mu.Lock()
	v := p.admit(key, known, start)
	timeout := false
	if v != admitted {
		p.timeoutDebt += p.lim.TimeoutFraction
		if p.timeoutDebt >= 1 {
			p.timeoutDebt--
			timeout = true
		}
		if timeout {
			p.count(key, Counts{TimedOut: 1})
		} else {
			p.count(key, Counts{Throttled: 1})
		}
	}
	p.mu.Unlock()

	if v != admitted {
		status := p.refuse(w, r, v, timeout)
		p.logWire(start, r, status, reqBytes)
		return
	}

	body := &countingBody{rc: r.Body}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = body
	}
	rec := &recorder{ResponseWriter: w}
	p.rp.ServeHTTP(rec, r)

	var later int64
	if r.ContentLength <= 0 {
		reqBytes = body.n.Load()
		later += reqBytes
	}
	if r.Method == http.MethodGet && !ranged {
		// A read's body is the data the limit is about; the small XML
		// answers to writes and errors are left out.
		later += rec.n
	}
	p.mu.Lock()
	p.charge(key, later)
	p.count(key, Counts{Admitted: 1, Bytes: known + later})
	p.mu.Unlock()
	p.logWire(start, r, rec.status(), reqBytes)
}

// maxDrain bounds how much of a refused request's body is read. Azure's
// largest Put Page is 4 MiB; a bigger body is cut off, and net/http then
// closes the connection instead of reusing it.
const maxDrain = 16 << 20

// Error bodies, as Azure words them. The service's XML starts with a UTF-8
// byte order mark; clients must cope with it, so it is sent here too.
const (
	msgOps     = "Operations per second is over the account limit."
	msgIngress = "Ingress is over the account limit."
	msgEgress  = "Egress is over the account limit."
	msgTimeout = "Operation could not be completed within the specified time."
	xmlBOM     = "\ufeff"
)

// refuse answers r without forwarding it and returns the status sent.
func (p *Proxy) refuse(w http.ResponseWriter, r *http.Request, v verdict, timeout bool) int {
	// Read the body the client sent, so the connection stays usable for
	// its next request, as it does with Azure.
	if r.Body != nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, maxDrain))
		_ = r.Body.Close()
	}
	status, code, msg := http.StatusServiceUnavailable, "ServerBusy", msgOps
	switch {
	case timeout:
		status, code, msg = http.StatusInternalServerError, "OperationTimedOut", msgTimeout
	case v == overBytes && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		msg = msgEgress
	case v == overBytes:
		msg = msgIngress
	}
	id := requestID()
	body := xmlBOM + `<?xml version="1.0" encoding="utf-8"?><Error><Code>` + code + `</Code><Message>` +
		msg + "\nRequestId:" + id + "\nTime:" + p.now().UTC().Format("2006-01-02T15:04:05.0000000Z") +
		`</Message></Error>`
	h := w.Header()
	h.Set("Content-Type", "application/xml")
	h.Set("x-ms-error-code", code)
	h.Set("x-ms-request-id", id)
	h.Set("Server", "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0")
	if v := r.Header.Get("x-ms-version"); v != "" {
		h.Set("x-ms-version", v)
	}
	if v := r.Header.Get("x-ms-client-request-id"); v != "" {
		h.Set("x-ms-client-request-id", v)
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, body)
	}
	return status
}

// requestID returns a random UUID-shaped string like Azure's request ids.
func requestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// wireLine is one request in the wire log.
type wireLine struct {
	Time         string  `json:"time"`
	Method       string  `json:"method"`
	Path         string  `json:"path"`
	Comp         string  `json:"comp,omitempty"`
	Range        string  `json:"range,omitempty"`
	RequestBytes int64   `json:"request_bytes"`
	Status       int     `json:"status"`
	DurationMS   float64 `json:"duration_ms"`
}

// logWire writes r's line to the wire log, if there is one. Only the comp
// parameter of the query is kept: the rest may be a SAS.
func (p *Proxy) logWire(start time.Time, r *http.Request, status int, reqBytes int64) {
	if p.wire == nil {
		return
	}
	rng := r.Header.Get("x-ms-range")
	if rng == "" {
		rng = r.Header.Get("Range")
	}
	line, err := json.Marshal(wireLine{
		Time:         start.UTC().Format(time.RFC3339Nano),
		Method:       r.Method,
		Path:         r.URL.Path,
		Comp:         r.URL.Query().Get("comp"),
		Range:        rng,
		RequestBytes: reqBytes,
		Status:       status,
		DurationMS:   float64(p.now().Sub(start).Microseconds()) / 1000,
	})
	if err != nil {
		return
	}
	line = append(line, '\n')
	p.wireMu.Lock()
	_, _ = p.wire.Write(line)
	p.wireMu.Unlock()
}

// countingBody counts the bytes read from a request body whose length was
// not announced.
// The count is atomic: the transport may still be reading the body when
// the answer has come back (a server may answer before reading it all).
type countingBody struct {
	rc io.ReadCloser
	n  atomic.Int64
}

func (c *countingBody) Read(b []byte) (int, error) {
	n, err := c.rc.Read(b)
	c.n.Add(int64(n))
	return n, err
}

func (c *countingBody) Close() error { return c.rc.Close() }

// recorder remembers the status and counts the body bytes of a response.
type recorder struct {
	http.ResponseWriter
	code int
	n    int64
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.n += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController (which ReverseProxy uses to flush)
// reach the server's writer.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}
