package throttle

import (
	"net/http/httptest"
	"strings"
	"testing"
)

// Server is a throttling proxy listening on a loopback port for one test.
type Server struct {
	// Endpoint is the proxy's URL in the target's form, e.g.
	// http://127.0.0.1:41235/devstoreaccount1: use it wherever the
	// Azurite endpoint would be used.
	Endpoint string
	// Proxy is the handler, for its Stats.
	Proxy *Proxy
}

// Start builds a proxy in front of target with lim, serves it on
// 127.0.0.1 on a free port, and stops it in t.Cleanup.
func Start(t testing.TB, target string, lim Limits, opts ...Option) *Server {
	t.Helper()
	p, err := New(target, lim, opts...)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(p)
	t.Cleanup(func() {
		srv.Close()
		p.CloseIdleConnections()
	})
	return &Server{Endpoint: p.Endpoint(strings.TrimPrefix(srv.URL, "http://")), Proxy: p}
}

// ContainerURL returns the URL of container name through the proxy.
func (s *Server) ContainerURL(name string) string { return s.Endpoint + "/" + name }

// BlobURL returns the URL of blob in container through the proxy.
func (s *Server) BlobURL(container, blob string) string {
	return s.Endpoint + "/" + container + "/" + blob
}
