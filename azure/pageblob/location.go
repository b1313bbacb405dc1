package pageblob

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// Location is a parsed blob URL.
type Location struct {
	// Scheme and Host are those of the URL ("https", "acct.blob.core.windows.net").
	Scheme, Host string
	// Account is the storage account, from the host name or, for an
	// IP-style (emulator) URL, from the first path segment.
	Account string
	// Container and Blob name the page blob.
	Container, Blob string
	// SAS is the query string when it carries a shared access signature.
	SAS string
	// IPStyle is true for http(s)://host:port/account/container/blob URLs,
	// the form the emulator uses.
	IPStyle bool
}

// ParseLocation parses a page blob URL. Accepted forms:
//
//	https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS]
//	http://127.0.0.1:10000/ACCOUNT/CONTAINER/BLOB          (Azurite)
func ParseLocation(raw string) (Location, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Location{}, fmt.Errorf("%w: %v", ErrBadURL, redactErr(err))
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return Location{}, fmt.Errorf("%w: %q: want https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB", ErrBadURL, Redact(raw))
	}
	l := Location{Scheme: u.Scheme, Host: u.Host}
	host := u.Hostname()
	path := strings.Trim(u.Path, "/")
	parts := strings.SplitN(path, "/", 3)
	if net.ParseIP(host) != nil || host == "localhost" {
		l.IPStyle = true
		if len(parts) < 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
			return Location{}, fmt.Errorf("%w: %q: an emulator URL is http://HOST:PORT/ACCOUNT/CONTAINER/BLOB", ErrBadURL, Redact(raw))
		}
		l.Account, l.Container, l.Blob = parts[0], parts[1], parts[2]
	} else {
		l.Account, _, _ = strings.Cut(host, ".")
		parts = strings.SplitN(path, "/", 2)
		if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
			return Location{}, fmt.Errorf("%w: %q: want https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB", ErrBadURL, Redact(raw))
		}
		l.Container, l.Blob = parts[0], parts[1]
	}
	if err := checkContainerName(l.Container); err != nil {
		return Location{}, fmt.Errorf("%w: %q: %v", ErrBadURL, Redact(raw), err)
	}
	if q := u.Query(); q.Get("sig") != "" {
		l.SAS = u.RawQuery
	} else if u.RawQuery != "" {
		return Location{}, fmt.Errorf("%w: %q has a query that is not a SAS (no sig=)", ErrBadURL, Redact(raw))
	}
	return l, nil
}

// IsEmulator reports whether the URL points at a local Azurite: an
// IP-style loopback URL for the development account.
func (l Location) IsEmulator() bool {
	if !l.IPStyle {
		return false
	}
	h, _, err := net.SplitHostPort(l.Host)
	if err != nil {
		h = l.Host
	}
	ip := net.ParseIP(h)
	return h == "localhost" || (ip != nil && ip.IsLoopback())
}

// ServiceURL is the blob service endpoint (no container, no SAS).
func (l Location) ServiceURL() string {
	if l.IPStyle {
		return fmt.Sprintf("%s://%s/%s", l.Scheme, l.Host, l.Account)
	}
	return fmt.Sprintf("%s://%s", l.Scheme, l.Host)
}

// ContainerURL is the container's URL without the SAS.
func (l Location) ContainerURL() string {
	return l.ServiceURL() + "/" + l.Container
}

// URL is the blob's URL without the SAS: safe to log and to store.
func (l Location) URL() string {
	return l.ContainerURL() + "/" + escapePath(l.Blob)
}

func escapePath(p string) string {
	segs := strings.Split(p, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return strings.Join(segs, "/")
}

func withSAS(u, sas string) string {
	if sas == "" {
		return u
	}
	return u + "?" + sas
}

// Redact replaces the signature of a SAS in any URL-like string so it can
// be printed or logged.
func Redact(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.RawQuery == "" {
		return s
	}
	q := u.Query()
	if q.Get("sig") == "" {
		return s
	}
	q.Set("sig", "REDACTED")
	u.RawQuery = q.Encode()
	return u.String()
}

func redactErr(err error) string {
	if ue, ok := err.(*url.Error); ok {
		return ue.Op + " " + Redact(ue.URL) + ": " + ue.Err.Error()
	}
	return err.Error()
}

// checkContainerName applies Azure's container naming rules, which the
// service reports only as an opaque 400.
func checkContainerName(c string) error {
	if len(c) < 3 || len(c) > 63 {
		return fmt.Errorf("container name %q must be 3 to 63 characters long", c)
	}
	for i, r := range c {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' && i > 0 && i < len(c)-1 && c[i-1] != '-'
		if !ok {
			return fmt.Errorf("container name %q may hold only lowercase letters, digits and single hyphens, starting and ending with a letter or digit", c)
		}
	}
	return nil
}

// DevAccount and DevKey are the Azurite emulator's well-known development
// account and key, published in Azurite's documentation; they protect
// nothing. An emulator URL naming DevAccount is signed with DevKey when no
// other credential is given.
const (
	DevAccount = "devstoreaccount1"
	DevKey     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
