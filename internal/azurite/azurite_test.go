package azurite

import (
	"net/http"
	"testing"
)

// TestStrictByDefault proves that Start gives the strict emulator and
// Loose the lenient one: strict Azurite refuses a download asking for the
// range's CRC64 (x-ms-range-get-content-crc64, which it cannot compute) with
// 500 FeatureNotSupported, before it looks at authentication; loose Azurite
// ignores the header and goes on to refuse the unsigned request.
func TestStrictByDefault(t *testing.T) {
	for _, tc := range []struct {
		name       string
		opts       []Option
		wantStrict bool
	}{
		{"default", nil, true},
		{"loose", []Option{Loose()}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Start(t, tc.opts...)
			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, s.BlobURL("disks", "strict.vhd"), nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("x-ms-range", "bytes=0-511")
			req.Header.Set("x-ms-range-get-content-crc64", "true")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			code := resp.Header.Get("x-ms-error-code")
			t.Logf("GET with x-ms-range-get-content-crc64: %d %s", resp.StatusCode, code)
			refused := resp.StatusCode == http.StatusInternalServerError && code == "FeatureNotSupported"
			if refused != tc.wantStrict {
				t.Errorf("GET with x-ms-range-get-content-crc64: %d %s; want the strict refusal: %v", resp.StatusCode, code, tc.wantStrict)
			}
		})
	}
}
