// Metrics for an operator, in Prometheus's text format. Its own file
// because every other file counts into it.

package main

import (
	"bytes"
	"cmp"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
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

// counters is every counter there is, with its help; a labelled one lists
// its label's values: name{label="a|b"}. /metrics shows every series from
// the start, 0 until it happens, so that rates work from the first scrape.
var counters = []struct{ name, help string }{
	{"gochat_registrations_total", "Users registered."},
	{"gochat_logins_total", "Successful logins."},
	{"gochat_messages_accepted_total", "Chat messages stored and broadcast."},
	{"gochat_deliveries_total", "Chat messages queued for their recipients."},
	{`gochat_messages_refused_total{code="invalid_message|message_too_long|rate_limited|storage_error"}`,
		"Chat frames refused, by the error ack's code."},
	{`gochat_clients_dropped_total{reason="slow|stalled|silent"}`, "WebSockets the server dropped, by reason."},
	{`gochat_http_responses_total{class="1xx|2xx|3xx|4xx|5xx"}`, "HTTP responses, by status class."},
	{"gochat_connections_refused_total", "Connections closed unanswered: their address had -max-conns-per-ip."},
}

// version is a release's name, set by go build -ldflags "-X main.version=v1.0.0";
// without it, Go's record of the build names it.
var version string

var started = time.Now() // the process's start, near enough

func buildVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok && version == "" {
		return info.Main.Version
	}
	return cmp.Or(version, "unknown")
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
		m.writeCounters(&b)
		var mem runtime.MemStats
		runtime.ReadMemStats(&mem)
		cpu, resident := procStat()
		fds, _ := os.ReadDir("/proc/self/fd")
		for _, g := range []struct {
			name, kind, help string
			value            float64
		}{
			{"gochat_websockets_open", "gauge", "WebSockets open.", float64(len(hub.Online()))},
			{`gochat_build_info{version="` + buildVersion() + `"}`, "gauge", "The version running, always 1.", 1},
			{"process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", cpu},
			{"process_resident_memory_bytes", "gauge", "Resident memory size, in bytes.", resident},
			{"process_open_fds", "gauge", "Open file descriptors.", float64(len(fds))},
			{"process_start_time_seconds", "gauge", "Start time, in seconds since the Unix epoch.", float64(started.Unix())},
			{"go_goroutines", "gauge", "Goroutines that exist.", float64(runtime.NumGoroutine())},
			{"go_memstats_heap_alloc_bytes", "gauge", "Heap bytes allocated and in use.", float64(mem.HeapAlloc)},
			{"go_memstats_sys_bytes", "gauge", "Bytes obtained from the system.", float64(mem.Sys)},
			{"go_gc_cycles_total", "counter", "Garbage collections completed.", float64(mem.NumGC)},
			{"go_gc_pause_seconds_total", "counter", "Time the world stopped for garbage collection, in seconds.", float64(mem.PauseTotalNs) / 1e9},
		} {
			family, _, _ := strings.Cut(g.name, "{")
			fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n%s %g\n", family, g.help, family, g.kind, g.name, g.value)
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		w.Write([]byte(b.String()))
	})
}

// writeCounters writes the counters, then the commit latency histogram.
func (m *Metrics) writeCounters(b *strings.Builder) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range counters {
		family, labels, _ := strings.Cut(c.name, "{")
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s counter\n", family, c.help, family)
		label, values, _ := strings.Cut(strings.TrimSuffix(labels, `"}`), `="`)
		for _, v := range strings.Split(values, "|") {
			series := family
			if labels != "" {
				series = fmt.Sprintf(`%s{%s="%s"}`, family, label, v)
			}
			fmt.Fprintf(b, "%s %d\n", series, m.counters[series])
		}
	}
	b.WriteString("# HELP gochat_db_commit_seconds Commits of chat messages, by how long they took.\n")
	b.WriteString("# TYPE gochat_db_commit_seconds histogram\n")
	var cumulative int64
	for i, le := range commitBuckets {
		cumulative += m.commits[i]
		fmt.Fprintf(b, "gochat_db_commit_seconds_bucket{le=\"%g\"} %d\n", le, cumulative)
	}
	fmt.Fprintf(b, "gochat_db_commit_seconds_bucket{le=\"+Inf\"} %d\n", m.commitN)
	fmt.Fprintf(b, "gochat_db_commit_seconds_sum %g\ngochat_db_commit_seconds_count %d\n", m.commitS, m.commitN)
}

// procStat returns the process's CPU seconds and resident bytes from
// Linux's /proc/self/stat (0 elsewhere): fields 14 and 15 in ticks of the
// usual 1/100 s, field 24 in pages; the name before them may hold spaces.
func procStat() (cpuSeconds, residentBytes float64) {
	stat, _ := os.ReadFile("/proc/self/stat")
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(fields) < 22 {
		return 0, 0
	}
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	pages, _ := strconv.ParseFloat(fields[21], 64)
	return (utime + stime) / 100, pages * float64(os.Getpagesize())
}

// statusRecorder counts responses by status class, the implicit 200 of a
// handler that only writes too; Unwrap lets /ws hijack (its 101 is counted
// as the library is about to write it). An informational 1xx header is
// not the response: what follows it is counted.
type statusRecorder struct {
	http.ResponseWriter
	metrics *Metrics
	counted bool
}

func (s *statusRecorder) WriteHeader(status int) {
	if !s.counted && status >= 200 {
		s.counted = true
		s.metrics.countResponse(status)
	}
	s.ResponseWriter.WriteHeader(status)
}

func (s *statusRecorder) Write(p []byte) (int, error) {
	if !s.counted {
		s.WriteHeader(http.StatusOK)
	}
	return s.ResponseWriter.Write(p)
}

func (m *Metrics) countResponse(status int) {
	m.Add(fmt.Sprintf(`gochat_http_responses_total{class="%dxx"}`, status/100), 1)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }
