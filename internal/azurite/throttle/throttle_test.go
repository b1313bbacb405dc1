package throttle

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is the proxy's time in these tests: it moves only when a test
// moves it, so bucket levels are exact.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2024, 5, 6, 7, 8, 9, 123456700, time.UTC)}
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// seen is one request as the backend received it.
type seen struct {
	method, path, rawQuery, host string
	bodyLen                      int
}

// backend stands in for Azurite: it records what reaches it, answers
// writes with 201 and reads with getSize bytes (or the requested range).
type backend struct {
	srv     *httptest.Server
	getSize int
	// during, if set, runs while a request is being served.
	during func()

	mu   sync.Mutex
	reqs []seen
}

func newBackend(t *testing.T) *backend {
	b := &backend{getSize: 1500}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		b.mu.Lock()
		b.reqs = append(b.reqs, seen{r.Method, r.URL.Path, r.URL.RawQuery, r.Host, len(body)})
		during := b.during
		b.mu.Unlock()
		if during != nil {
			during()
		}
		switch r.Method {
		case http.MethodGet:
			n := b.getSize
			if l, ok := rangeLen(r.Header); ok {
				n = int(l)
			}
			w.Write(bytes.Repeat([]byte{'x'}, n))
		default:
			w.WriteHeader(http.StatusCreated)
		}
	}))
	t.Cleanup(b.srv.Close)
	return b
}

func (b *backend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.reqs)
}

func (b *backend) last() seen {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.reqs[len(b.reqs)-1]
}

// answer is a response read whole.
type answer struct {
	status int
	header http.Header
	body   string
}

func do(t *testing.T, method, u string, body []byte, hdr map[string]string) answer {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, string(b)}
}

// setup starts a backend and a proxy in front of it with the fake clock.
func setup(t *testing.T, lim Limits, opts ...Option) (*backend, *Server, *fakeClock) {
	t.Helper()
	b := newBackend(t)
	clk := newClock()
	s := Start(t, b.srv.URL+"/devstoreaccount1", lim, append([]Option{WithClock(clk.now)}, opts...)...)
	t.Cleanup(http.DefaultClient.CloseIdleConnections)
	return b, s, clk
}

var page = bytes.Repeat([]byte{0xab}, 512)

func putPage(t *testing.T, blobURL string) answer {
	t.Helper()
	return do(t, http.MethodPut, blobURL+"?comp=page", page, map[string]string{"x-ms-range": "bytes=0-511", "x-ms-page-write": "update"})
}

// checkRefusal asserts a refusal exactly as Azure words it.
func checkRefusal(t *testing.T, a answer, status int, code, msg string, at time.Time) {
	t.Helper()
	if a.status != status {
		t.Fatalf("status %d, want %d (body %q)", a.status, status, a.body)
	}
	id := a.header.Get("x-ms-request-id")
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`).MatchString(id) {
		t.Errorf("x-ms-request-id %q is not a uuid", id)
	}
	if got := a.header.Get("x-ms-error-code"); got != code {
		t.Errorf("x-ms-error-code %q, want %q", got, code)
	}
	if got := a.header.Get("Content-Type"); got != "application/xml" {
		t.Errorf("Content-Type %q, want application/xml", got)
	}
	want := "\ufeff" + `<?xml version="1.0" encoding="utf-8"?><Error><Code>` + code + `</Code><Message>` + msg +
		"\nRequestId:" + id + "\nTime:" + at.UTC().Format("2006-01-02T15:04:05.0000000Z") + `</Message></Error>`
	if a.body != want {
		t.Errorf("body\n%q\nwant\n%q", a.body, want)
	}
}

func TestForwardsUnderTheLimitUnchanged(t *testing.T) {
	b, s, _ := setup(t, Limits{RequestsPerSecond: 10})
	blob := s.BlobURL("c", "dir/b.vhd")
	for i := 0; i < 10; i++ {
		a := do(t, http.MethodPut, blob+"?comp=page&sv=2021&sig=abc%2Bdef", page, nil)
		if a.status != http.StatusCreated {
			t.Fatalf("request %d: status %d, body %q", i, a.status, a.body)
		}
	}
	if n := b.count(); n != 10 {
		t.Fatalf("backend saw %d requests, want 10", n)
	}
	got := b.last()
	backendHost := strings.TrimPrefix(b.srv.URL, "http://")
	want := seen{http.MethodPut, "/devstoreaccount1/c/dir/b.vhd", "comp=page&sv=2021&sig=abc%2Bdef", backendHost, 512}
	if got != want {
		t.Fatalf("backend got %+v, want %+v", got, want)
	}
	st := s.Proxy.Stats()
	wantCounts := Counts{Admitted: 10, Bytes: 10 * 512}
	if st.Total != wantCounts || st.Blobs["/devstoreaccount1/c/dir/b.vhd"] != wantCounts || len(st.Blobs) != 1 {
		t.Fatalf("stats %+v, want %+v for the one blob", st, wantCounts)
	}
}

func TestRefusesTheExcessLikeAzure(t *testing.T) {
	b, s, clk := setup(t, Limits{RequestsPerSecond: 10})
	blob := s.BlobURL("c", "b")
	for i := 0; i < 10; i++ {
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("request %d within the burst: status %d", i, a.status)
		}
	}
	a := putPage(t, blob)
	checkRefusal(t, a, http.StatusServiceUnavailable, "ServerBusy", "Operations per second is over the account limit.", clk.now())
	if n := b.count(); n != 10 {
		t.Fatalf("a refused request reached the backend: %d requests", n)
	}

	// A tenth of a second earns one request.
	clk.advance(100 * time.Millisecond)
	if a := putPage(t, blob); a.status != http.StatusCreated {
		t.Fatalf("after 100 ms: status %d", a.status)
	}
	if a := putPage(t, blob); a.status != http.StatusServiceUnavailable {
		t.Fatalf("second request after 100 ms: status %d, want 503", a.status)
	}
	// An idle hour still earns only one second's burst.
	clk.advance(time.Hour)
	for i := 0; i < 10; i++ {
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("request %d after an idle hour: status %d", i, a.status)
		}
	}
	if a := putPage(t, blob); a.status != http.StatusServiceUnavailable {
		t.Fatalf("11th request after an idle hour: status %d, want 503", a.status)
	}
	st := s.Proxy.Stats().Blobs["/devstoreaccount1/c/b"]
	if want := (Counts{Admitted: 21, Throttled: 3, Bytes: 21 * 512}); st != want {
		t.Fatalf("stats %+v, want %+v", st, want)
	}
}

// trackedBody records whether the proxy read a refused request's body to
// the end and closed it.
type trackedBody struct {
	r           *bytes.Reader
	eof, closed bool
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *trackedBody) Close() error { b.closed = true; return nil }

func TestRefusalDrainsAndClosesTheBody(t *testing.T) {
	clk := newClock()
	p, err := New("http://127.0.0.1:1/devstoreaccount1", Limits{RequestsPerSecond: 1, TimeoutFraction: 0}, WithClock(clk.now))
	if err != nil {
		t.Fatal(err)
	}
	// Spend the blob's one token on a request that goes nowhere (port 1
	// refuses the connection; the proxy answers 502).
	req := httptest.NewRequest(http.MethodGet, "/devstoreaccount1/c/b", nil)
	rec := httptest.NewRecorder()
	p.ServeHTTP(rec, req)
	if rec.Code != http.StatusBadGateway {
		t.Fatalf("unreachable target: status %d, want 502", rec.Code)
	}
	body := &trackedBody{r: bytes.NewReader(make([]byte, 4<<20))}
	req = httptest.NewRequest(http.MethodPut, "/devstoreaccount1/c/b?comp=page", body)
	rec = httptest.NewRecorder()
	p.ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", rec.Code)
	}
	if !body.eof || !body.closed {
		t.Fatalf("refused body: read to the end %v, closed %v; want both", body.eof, body.closed)
	}
}

func TestBlobsHaveTheirOwnBudget(t *testing.T) {
	b, s, _ := setup(t, Limits{RequestsPerSecond: 5})
	for _, name := range []string{"a", "b"} {
		for i := 0; i < 5; i++ {
			if a := putPage(t, s.BlobURL("c", name)); a.status != http.StatusCreated {
				t.Fatalf("blob %s request %d: status %d", name, i, a.status)
			}
		}
		if a := putPage(t, s.BlobURL("c", name)); a.status != http.StatusServiceUnavailable {
			t.Fatalf("blob %s 6th request: status %d, want 503", name, a.status)
		}
	}
	// The same name in another container is another blob.
	if a := putPage(t, s.BlobURL("d", "a")); a.status != http.StatusCreated {
		t.Fatalf("blob d/a: status %d", a.status)
	}
	// Container- and account-level requests are never limited here.
	for i := 0; i < 20; i++ {
		if a := do(t, http.MethodPut, s.ContainerURL("c")+"?restype=container", nil, nil); a.status != http.StatusCreated {
			t.Fatalf("container request %d: status %d", i, a.status)
		}
		if a := do(t, http.MethodGet, s.Endpoint+"?comp=list", nil, nil); a.status != http.StatusOK {
			t.Fatalf("account request %d: status %d", i, a.status)
		}
	}
	if n := b.count(); n != 5+5+1+40 {
		t.Fatalf("backend saw %d requests, want 51", n)
	}
	st := s.Proxy.Stats()
	if len(st.Blobs) != 3 || st.Blobs["/devstoreaccount1/c/a"].Admitted != 5 || st.Blobs["/devstoreaccount1/c/b"].Throttled != 1 ||
		st.Blobs["/devstoreaccount1/d/a"].Admitted != 1 {
		t.Fatalf("per-blob stats %+v", st.Blobs)
	}
	if st.Total.Admitted != 51 || st.Total.Throttled != 2 {
		t.Fatalf("total %+v, want 51 admitted, 2 throttled", st.Total)
	}
}

func TestByteLimitLetsABigWriteThroughIntoDebt(t *testing.T) {
	b, s, clk := setup(t, Limits{BytesPerSecond: 1000})
	blob := s.BlobURL("c", "w")
	// 4 KiB into a 1000-byte bucket: admitted, the bucket at -3096.
	big := make([]byte, 4096)
	if a := do(t, http.MethodPut, blob+"?comp=page", big, nil); a.status != http.StatusCreated {
		t.Fatalf("4 KiB put into a full bucket: status %d", a.status)
	}
	a := putPage(t, blob)
	checkRefusal(t, a, http.StatusServiceUnavailable, "ServerBusy", "Ingress is over the account limit.", clk.now())
	// Three seconds pay 3000 of the 3096 owed: still in debt.
	clk.advance(3 * time.Second)
	if a := putPage(t, blob); a.status != http.StatusServiceUnavailable {
		t.Fatalf("still in debt: status %d, want 503", a.status)
	}
	clk.advance(97 * time.Millisecond) // 97 bytes: the bucket at +1
	if a := putPage(t, blob); a.status != http.StatusCreated {
		t.Fatalf("out of debt: status %d", a.status)
	}
	if n := b.count(); n != 2 {
		t.Fatalf("backend saw %d requests, want 2", n)
	}

	// Reads: a ranged read is charged its range up front, an unranged one
	// its body once sent.
	rblob := s.BlobURL("c", "r")
	if a := do(t, http.MethodGet, rblob, nil, map[string]string{"x-ms-range": "bytes=0-1999"}); a.status != http.StatusOK || len(a.body) != 2000 {
		t.Fatalf("ranged read: status %d, %d bytes", a.status, len(a.body))
	}
	a = do(t, http.MethodGet, rblob, nil, map[string]string{"Range": "bytes=0-9"})
	checkRefusal(t, a, http.StatusServiceUnavailable, "ServerBusy", "Egress is over the account limit.", clk.now())
	clk.advance(1001 * time.Millisecond) // -1000 + 1001: +1
	if a := do(t, http.MethodGet, rblob, nil, nil); a.status != http.StatusOK || len(a.body) != 1500 {
		t.Fatalf("unranged read: status %d, %d bytes", a.status, len(a.body))
	}
	// The 1500 bytes sent put the bucket at -1499.
	clk.advance(1499 * time.Millisecond)
	if a := do(t, http.MethodGet, rblob, nil, nil); a.status != http.StatusServiceUnavailable {
		t.Fatalf("the unranged read's bytes were not charged: status %d", a.status)
	}
	st := s.Proxy.Stats()
	if got, want := st.Blobs["/devstoreaccount1/c/w"], (Counts{Admitted: 2, Throttled: 2, Bytes: 4096 + 512}); got != want {
		t.Errorf("write blob stats %+v, want %+v", got, want)
	}
	if got, want := st.Blobs["/devstoreaccount1/c/r"], (Counts{Admitted: 2, Throttled: 2, Bytes: 2000 + 1500}); got != want {
		t.Errorf("read blob stats %+v, want %+v", got, want)
	}
}

func TestTimeoutFraction(t *testing.T) {
	t.Run("all", func(t *testing.T) {
		_, s, clk := setup(t, Limits{RequestsPerSecond: 1, TimeoutFraction: 1})
		blob := s.BlobURL("c", "b")
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("first request: status %d", a.status)
		}
		a := putPage(t, blob)
		checkRefusal(t, a, http.StatusInternalServerError, "OperationTimedOut", "Operation could not be completed within the specified time.", clk.now())
		if st := s.Proxy.Stats().Total; st != (Counts{Admitted: 1, TimedOut: 1, Bytes: 512}) {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("half", func(t *testing.T) {
		_, s, _ := setup(t, Limits{RequestsPerSecond: 1, TimeoutFraction: 0.5})
		blob := s.BlobURL("c", "b")
		putPage(t, blob)
		var got []int
		for i := 0; i < 6; i++ {
			got = append(got, putPage(t, blob).status)
		}
		want := []int{503, 500, 503, 500, 503, 500}
		if !slicesEqual(got, want) {
			t.Fatalf("refusals %v, want %v", got, want)
		}
		if st := s.Proxy.Stats().Total; st.Throttled != 3 || st.TimedOut != 3 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// TestSetLimitsStartsAndEndsAStorm lowers an unlimited proxy's limits
// (the storm: the excess refused, all of it as 500 OperationTimedOut), then
// lifts them again: every request goes through before and after, and the
// counters span the three phases.
func TestSetLimitsStartsAndEndsAStorm(t *testing.T) {
	b, s, clk := setup(t, Limits{})
	blob := s.BlobURL("c", "b")
	for i := 0; i < 20; i++ {
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("unlimited, request %d: status %d", i, a.status)
		}
	}
	storm := Limits{RequestsPerSecond: 2, TimeoutFraction: 1}
	if err := s.Proxy.SetLimits(storm); err != nil {
		t.Fatal(err)
	}
	if got := s.Proxy.Limits(); got != storm {
		t.Fatalf("Limits() = %+v after SetLimits(%+v)", got, storm)
	}
	// A full burst of the new limits, then the refusals.
	for i := 0; i < 2; i++ {
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("storm burst, request %d: status %d", i, a.status)
		}
	}
	for i := 0; i < 3; i++ {
		a := putPage(t, blob)
		checkRefusal(t, a, http.StatusInternalServerError, "OperationTimedOut", "Operation could not be completed within the specified time.", clk.now())
	}
	if err := s.Proxy.SetLimits(Limits{}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("after the storm, request %d: status %d", i, a.status)
		}
	}
	if n := b.count(); n != 42 {
		t.Fatalf("backend saw %d requests, want 42", n)
	}
	if st := s.Proxy.Stats().Total; st != (Counts{Admitted: 42, TimedOut: 3, Bytes: 42 * 512}) {
		t.Fatalf("stats %+v", st)
	}
	if err := s.Proxy.SetLimits(Limits{TimeoutFraction: 2}); err == nil {
		t.Fatal("SetLimits accepted a timeout fraction of 2")
	}
	if got := s.Proxy.Limits(); got != (Limits{}) {
		t.Fatalf("a refused SetLimits changed the limits to %+v", got)
	}
}

func slicesEqual(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// lineWriter hands each wire log line to the test as it is written, so the
// test waits for the lines rather than for time to pass.
type lineWriter struct{ lines chan string }

func (w lineWriter) Write(p []byte) (int, error) {
	w.lines <- string(p)
	return len(p), nil
}

func TestWireLogKeepsNoSecrets(t *testing.T) {
	w := lineWriter{make(chan string, 16)}
	b, s, clk := setup(t, Limits{RequestsPerSecond: 1}, WithWireLog(w))
	// The backend takes 5 ms of the fake clock to answer.
	b.during = func() { clk.advance(5 * time.Millisecond) }
	const secretSig, secretKey = "SiGnAtUrE%2Fsecret", "SharedKey devstoreaccount1:KeYsEcReT="
	blob := s.BlobURL("c", "b") + "?comp=page&sv=2021-08-06&se=2030-01-01&sp=rw&sig=" + secretSig
	hdr := map[string]string{"x-ms-range": "bytes=0-511", "Authorization": secretKey}
	start := newClock().t
	for i, want := range []struct {
		status int
		dur    float64
		at     time.Time
	}{{201, 5, start}, {503, 0, start.Add(5 * time.Millisecond)}} {
		if a := do(t, http.MethodPut, blob, page, hdr); a.status != want.status {
			t.Fatalf("request %d: status %d, want %d", i, a.status, want.status)
		}
		// The proxy logs a request after answering it: wait for the line
		// before the next request, so that the lines come in order.
		var line string
		select {
		case line = <-w.lines:
		case <-time.After(10 * time.Second):
			t.Fatalf("wire log line %d never came", i)
		}
		for _, secret := range []string{"SiGnAtUrE", "KeYsEcReT", "sig", "?", "sv=", "2021-08-06"} {
			if strings.Contains(line, secret) {
				t.Errorf("wire log line %q holds %q", line, secret)
			}
		}
		if !strings.HasSuffix(line, "}\n") || strings.Count(line, "\n") != 1 {
			t.Errorf("wire log line %q is not one JSON line", line)
		}
		var l wireLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("wire log line %q: %v", line, err)
		}
		ts, err := time.Parse(time.RFC3339Nano, l.Time)
		if err != nil || !ts.Equal(want.at) {
			t.Errorf("time %q (%v), want %v", l.Time, err, want.at)
		}
		wantLine := wireLine{Time: l.Time, Method: "PUT", Path: "/devstoreaccount1/c/b", Comp: "page", Range: "bytes=0-511",
			RequestBytes: 512, Status: want.status, DurationMS: want.dur}
		if l != wantLine {
			t.Errorf("wire log line %+v, want %+v", l, wantLine)
		}
	}
}

func TestBlobKey(t *testing.T) {
	p, err := New("http://127.0.0.1:10000/devstoreaccount1/", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	host, err := New("https://acct.blob.core.windows.net", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p          *Proxy
		path, want string
	}{
		{p, "/devstoreaccount1/c/b", "/devstoreaccount1/c/b"},
		{p, "/devstoreaccount1/c/dir/b.vhd", "/devstoreaccount1/c/dir/b.vhd"},
		{p, "/otheraccount/c/b", "/otheraccount/c/b"},
		{p, "/devstoreaccount1/c", ""},
		{p, "/devstoreaccount1/c/", ""},
		{p, "/devstoreaccount1", ""},
		{p, "/", ""},
		{host, "/c/b", "/c/b"},
		{host, "/c", ""},
	} {
		if got := c.p.blobKey(c.path); got != c.want {
			t.Errorf("blobKey(%q) with prefix %q = %q, want %q", c.path, c.p.prefix, got, c.want)
		}
	}
	if got := p.Endpoint("127.0.0.1:5"); got != "http://127.0.0.1:5/devstoreaccount1" {
		t.Errorf("Endpoint = %q", got)
	}
}

func TestNewRejectsBadInput(t *testing.T) {
	for _, c := range []struct {
		target string
		lim    Limits
	}{
		{"127.0.0.1:10000/devstoreaccount1", Limits{}},
		{"ftp://127.0.0.1/devstoreaccount1", Limits{}},
		{"http://127.0.0.1:1/devstoreaccount1?sig=x", Limits{}},
		{"http://127.0.0.1:1/devstoreaccount1", Limits{RequestsPerSecond: -1}},
		{"http://127.0.0.1:1/devstoreaccount1", Limits{TimeoutFraction: 1.5}},
	} {
		if _, err := New(c.target, c.lim); err == nil {
			t.Errorf("New(%q, %+v) accepted", c.target, c.lim)
		} else if strings.Contains(err.Error(), "sig=x") {
			t.Errorf("New's error quotes the query: %v", err)
		}
	}
	if l := StandardPageBlob(); l != (Limits{RequestsPerSecond: 500, BytesPerSecond: 60 << 20}) {
		t.Errorf("StandardPageBlob() = %+v", l)
	}
}

// TestDelayAddsToEveryRoundTrip: WithDelay holds each request that long
// before it is admitted and forwarded.
func TestDelayAddsToEveryRoundTrip(t *testing.T) {
	const delay = 50 * time.Millisecond
	b, s, _ := setup(t, Limits{}, WithDelay(delay))
	blob := s.BlobURL("c", "b.vhd")
	for i := range 3 {
		start := time.Now()
		if a := putPage(t, blob); a.status != http.StatusCreated {
			t.Fatalf("request %d: status %d", i, a.status)
		}
		if took := time.Since(start); took < delay {
			t.Fatalf("request %d answered in %v, under the %v delay", i, took, delay)
		}
	}
	if n := b.count(); n != 3 {
		t.Fatalf("backend saw %d requests, want 3", n)
	}
}
