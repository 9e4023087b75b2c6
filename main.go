// Command gochat is a small real-time chat server: register a name, log in
// with the secret key, and talk in one room over a WebSocket.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/netutil"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gochat:", err)
		os.Exit(1)
	}
}

// config is everything the command line sets.
type config struct {
	Addr, DB, TLSCert, TLSKey                 string
	LogFormat                                 string
	Version                                   bool
	SessionTTL, PingInterval, WriteTimeout    time.Duration
	AllowedOrigins, Admins                    map[string]bool
	TrustedProxies                            []netip.Prefix
	MsgRate, AuthRate, OpenRate, ReadRate     float64
	MsgBurst, AuthBurst, OpenBurst, ReadBurst int
	MaxConns, MaxConnsPerIP                   int
	History, ReplayMax, HistoryMax            int
	HistoryKeep                               time.Duration
	now                                       func() time.Time // tests set the clock,
	cleanupEvery                              time.Duration    // and how often cleanup runs
}

// parseConfig reads the flags. Usage goes to out.
func parseConfig(args []string, out io.Writer) (config, error) {
	cfg := config{now: time.Now, cleanupEvery: time.Minute, AllowedOrigins: map[string]bool{}, Admins: map[string]bool{},
		TrustedProxies: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}}
	fs := flag.NewFlagSet("gochat", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprint(out, "Usage:\n  gochat [flags]                     serve the chat\n",
			"  gochat backup [-db chat.db] FILE   copy the database, while it serves too\n  gochat -version\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.BoolVar(&cfg.Version, "version", false, "print the version and exit")
	fs.StringVar(&cfg.Addr, "addr", "0.0.0.0:7777", "listen address")
	fs.StringVar(&cfg.DB, "db", "chat.db", "SQLite database file (created if missing)")
	fs.DurationVar(&cfg.SessionTTL, "session-ttl", time.Hour, "idle session lifetime")
	fs.StringVar(&cfg.TLSCert, "tls-cert", "", "TLS certificate file (with -tls-key: serve HTTPS and WSS)")
	fs.StringVar(&cfg.TLSKey, "tls-key", "", "TLS private key file")
	fs.StringVar(&cfg.LogFormat, "log-format", "text", "log lines as text or json")
	fs.Func("allowed-origins", "comma-separated extra origins allowed to open the WebSocket", func(list string) error {
		for _, o := range strings.FieldsFunc(list, isListSeparator) {
			if normalizeOrigin(o) == "" {
				return fmt.Errorf("%q is not an origin like https://example.com", o)
			}
			cfg.AllowedOrigins[normalizeOrigin(o)] = true
		}
		return nil
	})
	fs.Func("admins", "comma-separated users who may delete messages and ban users", func(list string) error {
		for _, name := range strings.FieldsFunc(list, isListSeparator) {
			cfg.Admins[strings.ToLower(name)] = true
		}
		return nil
	})
	fs.DurationVar(&cfg.PingInterval, "ping-interval", 30*time.Second, "how often sockets are pinged; one silent for twice this is dropped")
	fs.DurationVar(&cfg.WriteTimeout, "write-timeout", 5*time.Second, "a socket that takes no byte of a write for this long is dropped as stalled")
	fs.Float64Var(&cfg.MsgRate, "msg-rate", 5, "chat messages per second per user, refill rate (0: no limit)")
	fs.IntVar(&cfg.MsgBurst, "msg-burst", 10, "chat messages a user may send at once")
	fs.Float64Var(&cfg.AuthRate, "auth-rate", 1, "registrations and failed logins per second per client IP, logins per user, refill rate (0: no limit)")
	fs.IntVar(&cfg.AuthBurst, "auth-burst", 10, "registrations and failed logins a client IP, or logins a user, may make at once")
	fs.Float64Var(&cfg.OpenRate, "open-rate", 1, "WebSocket opens per second per user, refill rate (0: no limit)")
	fs.IntVar(&cfg.OpenBurst, "open-burst", 10, "WebSocket opens a user may make at once")
	fs.Float64Var(&cfg.ReadRate, "read-rate", 5, "history pages (GET /api/messages) per second per user, refill rate (0: no limit)")
	fs.IntVar(&cfg.ReadBurst, "read-burst", 20, "history pages a user may read at once")
	fs.Func("trusted-proxies", "comma-separated proxy addresses or CIDRs whose X-Forwarded-For is believed (default 127.0.0.0/8,::1/128)", func(list string) (err error) {
		cfg.TrustedProxies, err = parsePrefixes(list)
		return err
	})
	fs.IntVar(&cfg.MaxConns, "max-conns", 10000, "most simultaneous WebSockets")
	fs.IntVar(&cfg.MaxConnsPerIP, "max-conns-per-ip", 256, "most connections from one client address (IPv6: /64), trusted proxies aside")
	fs.IntVar(&cfg.History, "history", 50, "stored messages sent on connect (0: none)")
	fs.IntVar(&cfg.ReplayMax, "replay-max", 1000, "most messages replayed on reconnect with ?since=")
	fs.DurationVar(&cfg.HistoryKeep, "history-keep", 720*time.Hour, "how long messages are kept")
	fs.IntVar(&cfg.HistoryMax, "history-max", 1000000, "most messages kept; the oldest go first")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	switch {
	case fs.NArg() > 0:
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	case cfg.SessionTTL <= 0 || cfg.PingInterval <= 0 || cfg.WriteTimeout <= 0 || cfg.HistoryKeep <= 0:
		return cfg, errors.New("-session-ttl, -ping-interval, -write-timeout and -history-keep must be positive")
	case (cfg.TLSCert == "") != (cfg.TLSKey == ""):
		return cfg, errors.New("-tls-cert and -tls-key go together")
	case cfg.LogFormat != "text" && cfg.LogFormat != "json":
		return cfg, errors.New("-log-format is text or json")
	case cfg.MsgRate < 0 || cfg.AuthRate < 0 || cfg.OpenRate < 0 || cfg.ReadRate < 0 || cfg.History < 0 || cfg.ReplayMax < 0 || cfg.MaxConns < 1 || cfg.MaxConnsPerIP < 1 || cfg.HistoryMax < 1:
		return cfg, errors.New("rates, -history and -replay-max must not be negative, -max-conns* and -history-max at least 1")
	}
	return cfg, nil
}

func parsePrefixes(list string) ([]netip.Prefix, error) {
	var prefixes []netip.Prefix
	for _, s := range strings.FieldsFunc(list, isListSeparator) {
		p, err := netip.ParsePrefix(s)
		if addr, aerr := netip.ParseAddr(s); err != nil && aerr == nil {
			p, err = netip.PrefixFrom(addr, addr.BitLen()), nil
		}
		if err != nil {
			return nil, fmt.Errorf("%q is not an address or CIDR", s)
		}
		prefixes = append(prefixes, p.Masked())
	}
	return prefixes, nil
}

func isListSeparator(r rune) bool { return r == ',' || r == ' ' }

// run serves until ctx is done, or with "backup" first copies the database.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == "backup" {
		return backup(args[1:], stdout)
	}
	cfg, err := parseConfig(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if cfg.Version {
		fmt.Fprintln(stdout, "gochat", buildVersion())
		return nil
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	var log slog.Handler = slog.NewTextHandler(stdout, nil)
	if cfg.LogFormat == "json" {
		log = slog.NewJSONHandler(stdout, nil)
	}
	return serve(ctx, cfg, ln, slog.New(log))
}

// backup copies the database to a new FILE, running or not.
func backup(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("gochat backup", flag.ContinueOnError)
	fs.SetOutput(stdout)
	db := fs.String("db", "chat.db", "SQLite database file to copy")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: gochat backup [-db chat.db] FILE")
	}
	if _, err := os.Stat(*db); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	store, err := OpenStore(*db, &Metrics{})
	if err != nil {
		return err
	}
	defer store.Close()
	if err := store.Backup(fs.Arg(0)); err != nil {
		return fmt.Errorf("backup to %s: %w", fs.Arg(0), err)
	}
	fmt.Fprintln(stdout, "gochat: backed up", *db, "to", fs.Arg(0))
	return nil
}

// serve serves on ln until ctx is done, then shuts down: sockets closed
// with 1001, requests finished, sessions saved, database closed.
func serve(ctx context.Context, cfg config, ln net.Listener, log *slog.Logger) error {
	defer ln.Close()
	srv := &http.Server{
		ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 15 * time.Second, WriteTimeout: 15 * time.Second,
		IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10,
		// What net/http reports (accept failing, TLS handshakes) needs an operator.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	metrics := &Metrics{}
	// Beyond -max-conns sockets and some requests, connections wait in the
	// kernel's queue instead of using up descriptors.
	maxConns := cfg.MaxConns + 1024
	ln = netutil.LimitListener(&connLimiter{Listener: ln, perClient: cfg.MaxConnsPerIP, crowdedAt: maxConns * 3 / 4,
		exempt: cfg.TrustedProxies, metrics: metrics, open: map[string]int{}, setCrowded: func(crowded bool) {
			log.Warn("keep-alives " + map[bool]string{true: "off, idle connections closed: near the connection cap", false: "on again"}[crowded])
			srv.SetKeepAlivesEnabled(!crowded)
		}}, maxConns)
	certs := &certFiles{cert: cfg.TLSCert, key: cfg.TLSKey}
	if cfg.TLSCert != "" {
		if err := certs.reload(); err != nil {
			return err
		}
		ln = tls.NewListener(ln, &tls.Config{GetCertificate: certs.get, MinVersion: tls.VersionTLS12})
	}
	lock, err := lockDatabase(cfg.DB)
	if err != nil {
		return err
	}
	defer lock.Close() // after store.Close: closing a file SQLite has open drops SQLite's locks
	store, err := OpenStore(cfg.DB, metrics)
	if err != nil {
		return err
	}
	defer store.Close()
	sessions, err := NewSessions(ctx, cfg.SessionTTL, cfg.now, store)
	if err != nil {
		return err
	}
	hub, err := NewHub(ctx, cfg, store, sessions, metrics, log)
	if err != nil {
		return err
	}
	lim := limits{auth: newRateLimiter(cfg.AuthRate, cfg.AuthBurst, cfg.now),
		opens: newRateLimiter(cfg.OpenRate, cfg.OpenBurst, cfg.now), reads: newRateLimiter(cfg.ReadRate, cfg.ReadBurst, cfg.now)}
	srv.Handler = routes(cfg, log, store, sessions, hub, metrics, lim)

	bg, stopBackground := context.WithCancel(context.Background())
	defer stopBackground()
	go every(bg, min(cfg.SessionTTL, cfg.cleanupEvery), func() {
		if err := sessions.Save(bg); err != nil && bg.Err() == nil {
			log.Error("save sessions", "err", err)
		}
		for _, l := range []*rateLimiter{lim.auth, lim.opens, lim.reads, hub.limit} {
			l.Sweep()
		}
		if err := certs.reload(); err != nil {
			log.Error("TLS certificate not reloaded: serving the last good one", "err", err)
		}
	})
	go every(bg, min(cfg.HistoryKeep/10, cfg.cleanupEvery), func() { deleteOldMessages(bg, cfg, hub, log) })

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("gochat listening", "addr", ln.Addr().String(), "db", cfg.DB, "tls", cfg.TLSCert != "")
	select {
	case err := <-served:
		hub.Shutdown(context.Background(), closeGoingAway)
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	shutdown := make(chan error, 1)
	go func() { shutdown <- srv.Shutdown(shutdownCtx) }()
	hub.Shutdown(shutdownCtx, closeGoingAway)
	if err := <-shutdown; err != nil {
		log.Warn("requests still running at shutdown", "err", err)
	}
	stopBackground()
	if err := sessions.Save(context.Background()); err != nil {
		log.Error("save sessions", "err", err)
	}
	if err := store.Close(); err != nil {
		return fmt.Errorf("close db: %w", err)
	}
	log.Info("stopped")
	return nil
}

// deleteOldMessages deletes messages older than -history-keep or beyond
// the newest -history-max, a batch per step of the hub.
func deleteOldMessages(ctx context.Context, cfg config, hub *Hub, log *slog.Logger) {
	var total int64
	for n := int64(retireBatch); n == retireBatch && ctx.Err() == nil; total += n {
		r := retention{cfg.now().Add(-cfg.HistoryKeep), cfg.HistoryMax, make(chan int64, 1)}
		if !hub.send(r) {
			return
		}
		n = max(<-r.deleted, 0)
	}
	if total > 0 {
		log.Info("retention deleted old messages", "count", total)
	}
}

// certFiles serves the certificate in its files. reload, at start and on
// every cleanup tick, loads them again when they changed: a renewed
// certificate needs no restart, no handshake reads a file, and bad files
// are reported once and leave the last good certificate in place.
type certFiles struct {
	cert, key string
	version   string // the files' sizes and times at the last reload
	loaded    atomic.Pointer[tls.Certificate]
}

func (c *certFiles) reload() error {
	if c.cert == "" {
		return nil // no TLS
	}
	version := ""
	for _, name := range []string{c.cert, c.key} {
		if info, err := os.Stat(name); err == nil {
			version += fmt.Sprint(info.Size(), info.ModTime().UnixNano(), " ")
		}
	}
	if version == c.version {
		return nil
	}
	c.version = version
	cert, err := tls.LoadX509KeyPair(c.cert, c.key)
	if err != nil {
		return fmt.Errorf("load TLS key pair: %w", err)
	}
	c.loaded.Store(&cert)
	return nil
}

func (c *certFiles) get(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.loaded.Load(), nil }

// every calls f every interval until ctx is done.
func every(ctx context.Context, interval time.Duration, f func()) {
	t := time.NewTicker(max(interval, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}
