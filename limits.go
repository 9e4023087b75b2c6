// Abuse limits and what to believe of a request behind a proxy. Its own
// file because the HTTP API and the sockets both use it.

package main

import (
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// rateLimiter holds one token bucket per key: burst tokens at most,
// refilled at rate per second. A rate of 0 turns it off.
type rateLimiter struct {
	rate, burst float64
	now         func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

// maxBuckets bounds a limiter's memory against floods from many addresses.
const maxBuckets = 1 << 16

type bucket struct {
	tokens float64
	last   time.Time
}

func newRateLimiter(rate float64, burst int, now func() time.Time) *rateLimiter {
	return &rateLimiter{rate: rate, burst: float64(max(burst, 1)), now: now, buckets: make(map[string]*bucket)}
}

// Allow takes a token for key, or reports false and how long to wait.
func (l *rateLimiter) Allow(key string) (bool, time.Duration) {
	if l.rate <= 0 {
		return true, 0
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		for k := range l.buckets { // full: forget one, so memory stays bounded between sweeps
			if len(l.buckets) < maxBuckets {
				break
			}
			delete(l.buckets, k)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
	}
	b.tokens--
	return true, 0
}

// Sweep forgets the buckets that have refilled, as good as none.
func (l *rateLimiter) Sweep() {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for key, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.buckets, key)
		}
	}
}

// limits are the request limits. An address's bucket is only for what
// has no user yet, registrations and failed logins: many people share an
// address behind a NAT, and one of them must not lock the others out.
type limits struct {
	auth  *rateLimiter // registrations and failed logins by client address; logins by user
	opens *rateLimiter // WebSocket opens by user
	reads *rateLimiter // history pages by user
}

// allowed takes a token for key, or answers 429 with Retry-After.
func allowed(w http.ResponseWriter, r *http.Request, log *slog.Logger, name string, limit *rateLimiter, key string) bool {
	ok, wait := limit.Allow(key)
	if !ok {
		log.Warn("rate limited", "limit", name, "key", key, "client", clientAddr(r))
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
		writeError(w, http.StatusTooManyRequests, "too many requests, slow down")
	}
	return ok
}

// clientKey is what the request limits count by.
func clientKey(r *http.Request) string {
	addr := clientAddr(r)
	if !addr.IsValid() {
		addr = peerAddr(r) // an unreadable hop: counted as the proxy's
	}
	return addrKey(addr)
}

// addrKey is what limits count by: an IPv4 address, or an IPv6 /56, as
// one home line usually has a whole /56 (256 /64s) to pick from.
func addrKey(addr netip.Addr) string {
	if addr.Is6() {
		p, _ := addr.Prefix(56)
		return p.String()
	}
	return addr.String()
}

// connLimiter caps each client address's connections below the server's
// cap (netutil.LimitListener, around it), so that one client cannot take
// them all; trusted proxies' are many clients'. From crowdedAt on, the
// server is to close idle connections and keep none (setCrowded), until
// it is down to half that.
// A connection's kernel send buffer is kept small: a peer that stopped
// reading stalls a write after a few hundred KiB, not many MiB.
type connLimiter struct {
	net.Listener
	perClient, crowdedAt int
	exempt               []netip.Prefix
	setCrowded           func(bool)
	metrics              *Metrics

	mu      sync.Mutex
	open    map[string]int // by addrKey
	total   int
	crowded bool // Accept's own
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if tcp, ok := c.(*net.TCPConn); ok {
			tcp.SetWriteBuffer(64 << 10)
		}
		if counted := l.count(c); counted != nil {
			return counted, nil
		}
		l.metrics.Add("gochat_connections_refused_total", 1)
		c.Close()
	}
}

// count counts c against its address, or returns nil if it has its fill.
func (l *connLimiter) count(c net.Conn) net.Conn {
	peer, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	addr := peer.Addr().Unmap()
	key := addrKey(addr)
	l.mu.Lock()
	full := l.open[key] >= l.perClient && !inPrefixes(addr, l.exempt)
	if !full {
		l.open[key]++
		l.total++
	}
	crowded := l.total >= l.crowdedAt || l.crowded && l.total >= l.crowdedAt/2
	l.mu.Unlock()
	if crowded != l.crowded { // not under mu: it closes connections, which uncount
		l.crowded = crowded
		l.setCrowded(crowded)
	}
	if full {
		return nil
	}
	return countedConn{c, sync.OnceFunc(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.total--
		if l.open[key]--; l.open[key] == 0 {
			delete(l.open, key)
		}
	})}
}

// countedConn is uncounted on its first Close.
type countedConn struct {
	net.Conn
	uncount func()
}

func (c countedConn) Close() error {
	c.uncount()
	return c.Conn.Close()
}

// clientAddr is the TCP peer, or the last hop of X-Forwarded-For, which
// only a trusted proxy's requests still carry: the hop the proxy saw; the
// rest is the client's word.
func clientAddr(r *http.Request) netip.Addr {
	if hops := r.Header.Values("X-Forwarded-For"); len(hops) > 0 {
		last := hops[len(hops)-1]
		hop := strings.TrimSpace(last[strings.LastIndexByte(last, ',')+1:])
		if ap, err := netip.ParseAddrPort(hop); err == nil {
			return ap.Addr().Unmap()
		}
		a, _ := netip.ParseAddr(hop)
		return a.Unmap() // invalid if unreadable: never loopback or trusted
	}
	return peerAddr(r)
}

func peerAddr(r *http.Request) netip.Addr {
	ap, _ := netip.ParseAddrPort(r.RemoteAddr)
	return ap.Addr().Unmap()
}

// trustProxies drops X-Forwarded-For, -Proto and -Host unless the peer is
// a trusted proxy, and those not well formed: what is left is believed.
func trustProxies(trusted []netip.Prefix, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header
		if !inPrefixes(peerAddr(r), trusted) {
			h.Del("X-Forwarded-For")
			h.Del("X-Forwarded-Proto")
			h.Del("X-Forwarded-Host")
		}
		if p := strings.ToLower(firstHeaderValue(r, "X-Forwarded-Proto")); p != "http" && p != "https" {
			h.Del("X-Forwarded-Proto")
		}
		if host := firstHeaderValue(r, "X-Forwarded-Host"); len(host) > 255 || strings.Trim(host,
			"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]") != "" {
			h.Del("X-Forwarded-Host") // a host[:port], nothing that could end a CSP directive
		}
		next.ServeHTTP(w, r)
	})
}

func inPrefixes(addr netip.Addr, prefixes []netip.Prefix) bool {
	return slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Contains(addr) })
}

// requestScheme is the scheme the client used, behind a proxy too.
func requestScheme(r *http.Request) string {
	if p := firstHeaderValue(r, "X-Forwarded-Proto"); p != "" {
		return strings.ToLower(p)
	}
	if r.TLS != nil {
		return "https"
	}
	return "http"
}

// requestHost is the host the client asked for, behind a proxy too.
func requestHost(r *http.Request) string {
	if h := firstHeaderValue(r, "X-Forwarded-Host"); h != "" {
		return h
	}
	return r.Host
}

func firstHeaderValue(r *http.Request, name string) string {
	v, _, _ := strings.Cut(r.Header.Get(name), ",")
	return strings.TrimSpace(v)
}

// originAllowed lets in requests without Origin (not from a browser), from
// the server's own origin, and from -allowed-origins.
func originAllowed(r *http.Request, allowed map[string]bool) bool {
	origin := r.Header.Get("Origin")
	o := normalizeOrigin(origin)
	return origin == "" || o != "" && (o == normalizeOrigin(requestScheme(r)+"://"+requestHost(r)) || allowed[o])
}

// normalizeOrigin returns scheme://host, lower case, no default port, or "".
func normalizeOrigin(s string) string {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil || u.Scheme == "" || u.Host == "" {
		return ""
	}
	scheme, host := strings.ToLower(u.Scheme), strings.ToLower(u.Host)
	return scheme + "://" + strings.TrimSuffix(host, map[string]string{"http": ":80", "https": ":443"}[scheme])
}
