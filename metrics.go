// Metrics for an operator, in Prometheus's text format. Its own file
// because every other file counts into it.

package main

import (
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Metrics counts what the server does. The zero value is ready to use.
type Metrics struct {
	mu       sync.Mutex
	counters map[string]int64 // by name with labels, as exposed
	commits  [12]int64        // by bucket of commitBuckets, and one beyond
	commitN  int64
	commitS  float64
}

// commitBuckets bound the commit latency histogram's buckets, in seconds.
var commitBuckets = [11]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}

// Add adds n to the counter name, which may carry labels: `x{code="y"}`.
func (m *Metrics) Add(name string, n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.counters == nil {
		m.counters = make(map[string]int64)
	}
	m.counters[name] += n
}

// ObserveCommit records how long one commit of chat messages took.
func (m *Metrics) ObserveCommit(d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i, _ := slices.BinarySearch(commitBuckets[:], d.Seconds())
	m.commits[i]++
	m.commitN++
	m.commitS += d.Seconds()
}

// handleMetrics serves the metrics to loopback and trusted clients, and
// 404 to others, so that they do not leak through a public proxy.
func handleMetrics(m *Metrics, hub *Hub, trusted []netip.Prefix) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if addr := clientAddr(r); !addr.IsLoopback() && !inPrefixes(addr, trusted) {
			writeError(w, http.StatusNotFound, "not found")
			return
		}
		var b strings.Builder
		fmt.Fprintf(&b, "# TYPE gochat_websockets_open gauge\ngochat_websockets_open %d\n", len(hub.Online()))
		m.mu.Lock()
		defer m.mu.Unlock()
		typed := map[string]bool{}
		for _, name := range slices.Sorted(maps.Keys(m.counters)) {
			family, _, _ := strings.Cut(name, "{")
			if !typed[family] {
				typed[family] = true
				fmt.Fprintf(&b, "# TYPE %s counter\n", family)
			}
			fmt.Fprintf(&b, "%s %d\n", name, m.counters[name])
		}
		b.WriteString("# TYPE gochat_db_commit_seconds histogram\n")
		var cumulative int64
		for i, le := range commitBuckets {
			cumulative += m.commits[i]
			fmt.Fprintf(&b, "gochat_db_commit_seconds_bucket{le=\"%g\"} %d\n", le, cumulative)
		}
		fmt.Fprintf(&b, "gochat_db_commit_seconds_bucket{le=\"+Inf\"} %d\n", m.commitN)
		fmt.Fprintf(&b, "gochat_db_commit_seconds_sum %g\ngochat_db_commit_seconds_count %d\n", m.commitS, m.commitN)
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		w.Write([]byte(b.String()))
	})
}

// statusRecorder counts responses by status class; Unwrap lets /ws hijack.
type statusRecorder struct {
	http.ResponseWriter
	metrics *Metrics
}

func (s *statusRecorder) WriteHeader(status int) {
	s.metrics.Add(fmt.Sprintf(`gochat_http_responses_total{class="%dxx"}`, status/100), 1)
	s.ResponseWriter.WriteHeader(status)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }
