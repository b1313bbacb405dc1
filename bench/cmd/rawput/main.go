// Command rawput measures the server's ceiling for one request pattern:
// Put Pages of --bs bytes at random aligned offsets in the first --span
// bytes of a fresh page blob, from --conc goroutines, with no journal or
// flusher in the way. make bench uses it to set the replica-lag load at
// half the ceiling of the lag workload's own pattern (random 64 KiB
// writes), since a server takes small requests far slower than 4 MiB ones.
//
//	rawput --endpoint http://127.0.0.1:10000/devstoreaccount1 --bs 65536 --conc 8 --total 256MiB
//
// It prints {"mib_per_second": ..., "requests_per_second": ..., "p50_ms": ...,
// "p99_ms": ...}: the rates, and the percentiles of one request's round trip.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

func main() {
	endpoint := flag.String("endpoint", "", "blob service endpoint (required), e.g. http://127.0.0.1:10000/devstoreaccount1")
	bs := flag.Int("bs", 64<<10, "bytes per Put Page (multiple of 512, at most 4 MiB)")
	conc := flag.Int("conc", 8, "requests in flight")
	totalMiB := flag.Int("total-mib", 256, "MiB to send")
	spanGiB := flag.Int("span-gib", 4, "offsets are random within this many GiB")
	flag.Parse()
	if *endpoint == "" || *bs%512 != 0 || *bs <= 0 || *bs > 4<<20 || *conc < 1 {
		fmt.Fprintln(os.Stderr, "rawput: --endpoint is required; --bs a multiple of 512 up to 4 MiB; --conc >= 1")
		os.Exit(2)
	}
	if err := run(*endpoint, *bs, *conc, int64(*totalMiB)<<20, int64(*spanGiB)<<30); err != nil {
		fmt.Fprintln(os.Stderr, "rawput:", err)
		os.Exit(1)
	}
}

func run(endpoint string, bs, conc int, total, span int64) error {
	ctx := context.Background()
	size := max(span, 1<<30)
	c, err := pageblob.Open(fmt.Sprintf("%s/rawput/b%d.vhd", endpoint, time.Now().UnixNano()), nil)
	if err != nil {
		return err
	}
	f := vhdlayer.NewFixedFooter(uint64(size), time.Now())
	if err := c.Create(ctx, uint64(size), f.Encode(), pageblob.CreateOptions{CreateContainer: true}); err != nil {
		return err
	}
	defer c.Delete(context.WithoutCancel(ctx))
	data := make([]byte, bs)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	n := int(total / int64(bs))
	next := make(chan int64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	lat := make([]time.Duration, 0, n)
	t0 := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := range next {
				start := time.Now()
				err := c.PutPages(ctx, off, data, "")
				took := time.Since(start)
				mu.Lock()
				if err != nil {
					firstErr = err
				}
				lat = append(lat, took)
				mu.Unlock()
			}
		}()
	}
	for range n {
		next <- rand.Int64N(span/int64(bs)) * int64(bs)
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	el := time.Since(t0).Seconds()
	slices.Sort(lat)
	pct := func(q float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(q*float64(len(lat))))].Seconds() * 1000
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]float64{
		"mib_per_second": float64(n*bs) / (1 << 20) / el, "requests_per_second": float64(n) / el,
		"p50_ms": pct(0.5), "p99_ms": pct(0.99),
	})
}
