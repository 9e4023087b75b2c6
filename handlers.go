package main

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/websocket"
)

const maxBodyBytes = 4 << 10

// deps is what the HTTP API is built from.
type deps struct {
	cfg      config
	log      *slog.Logger
	store    *Store
	sessions *Sessions
	hub      *Hub
	authRate *rateLimiter // per client IP: register and login
	msgRate  *rateLimiter // per user: chat messages
}

// routes returns the server's handler: the API on Go 1.22 method patterns,
// with the mux's own 404 and 405 answers turned into JSON errors.
func routes(d *deps) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /api/register", limitAuth(d, handleRegister(d.store, d.log)))
	mux.Handle("POST /api/login", limitAuth(d, handleLogin(d.store, d.sessions, d.cfg.SessionTTL, d.log)))
	mux.Handle("GET /api/logout", handleLogout(d.sessions, d.hub, d.log))
	mux.Handle("POST /api/logout", handleLogout(d.sessions, d.hub, d.log))
	mux.Handle("GET /api/online", handleOnline(d.sessions, d.hub, d.cfg.SessionTTL))
	mux.Handle("GET /api/user/@me", handleMe(d.sessions, d.hub, d.cfg.SessionTTL))
	mux.Handle("GET /api/user/{name}", handleUser(d.store, d.sessions, d.hub, d.cfg.SessionTTL, d.log))
	mux.Handle("GET /api/messages", handleMessages(d.store, d.sessions, d.cfg.SessionTTL, d.log))
	mux.Handle("GET /healthz", handleHealth(d.store, d.log))
	mux.Handle("GET /ws", handleWebSocket(d))
	mux.Handle("GET /{$}", handleStatic("index.html"))
	mux.Handle("GET /app.js", handleStatic("app.js"))
	mux.Handle("GET /style.css", handleStatic("style.css"))
	return jsonErrors(mux)
}

// webFiles is the web client, built into the binary.
//
//go:embed web
var webFiles embed.FS

// handleStatic serves one file of the web client with headers that keep
// the page to its own origin: scripts, styles, fetches and the WebSocket.
func handleStatic(name string) http.Handler {
	body, err := webFiles.ReadFile("web/" + name)
	if err != nil {
		panic(err) // the file is embedded at build time; missing means a broken build
	}
	ctype := mime.TypeByExtension(path.Ext(name))
	modified := time.Now()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", ctype)
		h.Set("Content-Security-Policy", contentSecurityPolicy(r))
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		http.ServeContent(w, r, name, modified, bytes.NewReader(body))
	})
}

// contentSecurityPolicy allows the page's own origin only, and its
// WebSocket, named in full because not every browser counts ws: as 'self'.
func contentSecurityPolicy(r *http.Request) string {
	host := r.Host
	if h := firstHeaderValue(r, "X-Forwarded-Host"); h != "" {
		host = h
	}
	ws := "ws://" + host
	if requestScheme(r) == "https" {
		ws = "wss://" + host
	}
	return "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
		"connect-src 'self' " + ws + "; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
}

// jsonErrors rewrites the plain-text 404 and 405 responses of mux.
func jsonErrors(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		mux.ServeHTTP(&errorRewriter{ResponseWriter: w}, r)
	})
}

// errorRewriter replaces the body of an error status with a JSON error.
type errorRewriter struct {
	http.ResponseWriter
	rewrote bool
}

func (e *errorRewriter) WriteHeader(status int) {
	if status < 400 {
		e.ResponseWriter.WriteHeader(status)
		return
	}
	e.rewrote = true
	writeError(e.ResponseWriter, status, strings.ToLower(http.StatusText(status)))
}

func (e *errorRewriter) Write(p []byte) (int, error) {
	if e.rewrote {
		return len(p), nil
	}
	return e.ResponseWriter.Write(p)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body := mustJSON(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// internalError logs err and answers 500 without revealing it.
func internalError(w http.ResponseWriter, log *slog.Logger, r *http.Request, err error) {
	log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	writeError(w, http.StatusInternalServerError, "internal error")
}

// readBody reads a request body of at most maxBodyBytes, answering 413
// itself when it is larger.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", maxBodyBytes))
		return nil, false
	case err != nil:
		writeError(w, http.StatusBadRequest, "could not read request body")
		return nil, false
	}
	return body, true
}

// stringField parses data as exactly one JSON object holding exactly one
// field, name, whose value is a string, with nothing after the object.
func stringField(data []byte, name string) (string, error) {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return "", errors.New("not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	var fields map[string]json.RawMessage
	if err := dec.Decode(&fields); err != nil {
		return "", err
	}
	if _, err := dec.Token(); err != io.EOF {
		return "", errors.New("unexpected data after the JSON object")
	}
	raw, present := fields[name]
	if len(fields) != 1 || !present {
		return "", fmt.Errorf(`want exactly the field %q`, name)
	}
	var value string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &value) != nil {
		return "", fmt.Errorf("%q must be a string", name)
	}
	return value, nil
}

// bodyField reads a request body holding {"<name>": "<string>"} and returns
// the string, answering 413 or 422 itself.
func bodyField(w http.ResponseWriter, r *http.Request, name string) (string, bool) {
	body, ok := readBody(w, r)
	if !ok {
		return "", false
	}
	value, err := stringField(body, name)
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, fmt.Sprintf(`body must be {"%s": "<string>"}: %v`, name, err))
		return "", false
	}
	return value, true
}

func validUsername(name string) bool {
	if len(name) < 1 || len(name) > 32 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

func handleRegister(store *Store, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name, ok := bodyField(w, r, "username")
		if !ok {
			return
		}
		if !validUsername(name) {
			writeError(w, http.StatusBadRequest, "username must be 1 to 32 ASCII letters or digits")
			return
		}
		key, err := randomToken(43)
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		err = store.CreateUser(r.Context(), name, key)
		if errors.Is(err, ErrNameTaken) {
			writeError(w, http.StatusConflict, "username already taken")
			return
		}
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		writeJSON(w, http.StatusCreated, map[string]string{"key": key})
	})
}

func handleLogin(store *Store, sessions *Sessions, ttl time.Duration, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, ok := bodyField(w, r, "key")
		if !ok {
			return
		}
		user, err := store.UserByKey(r.Context(), key)
		if errors.Is(err, ErrNotFound) {
			writeError(w, http.StatusUnauthorized, "unknown key")
			return
		}
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		sid, err := sessions.Create(r.Context(), user)
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		setSessionCookie(w, r, sid, ttl)
		writeJSON(w, http.StatusOK, map[string]string{"username": user})
	})
}

func handleLogout(sessions *Sessions, hub *Hub, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if cookie, err := r.Cookie(sessionCookie); err == nil {
			if user, ok := sessions.Lookup(cookie.Value); ok {
				hub.Logout(user, cookie.Value)
			}
			if err := sessions.Delete(r.Context(), cookie.Value); err != nil {
				internalError(w, log, r, err)
				return
			}
		}
		setSessionCookie(w, r, "", 0)
		writeJSON(w, http.StatusOK, struct{}{})
	})
}

func handleOnline(sessions *Sessions, hub *Hub, ttl time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions, ttl); !ok {
			return
		}
		writeJSON(w, http.StatusOK, map[string][]string{"online_clients": hub.Online()})
	})
}

type userJSON struct {
	Username string `json:"username"`
	Online   bool   `json:"online"`
}

func handleMe(sessions *Sessions, hub *Hub, ttl time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, _, ok := authenticate(w, r, sessions, ttl)
		if !ok {
			return
		}
		writeJSON(w, http.StatusOK, userJSON{user, hub.IsOnline(user)})
	})
}

func handleUser(store *Store, sessions *Sessions, hub *Hub, ttl time.Duration, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions, ttl); !ok {
			return
		}
		name, err := store.UserByName(r.Context(), r.PathValue("name"))
		if errors.Is(err, ErrNotFound) {
			writeError(w, http.StatusNotFound, "no such user")
			return
		}
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		writeJSON(w, http.StatusOK, userJSON{name, hub.IsOnline(name)})
	})
}

type messagePage struct {
	Messages []messageJSON `json:"messages"`
}

func handleMessages(store *Store, sessions *Sessions, ttl time.Duration, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions, ttl); !ok {
			return
		}
		q := r.URL.Query()
		before, ok := positiveParam(q, "before", 0, 1<<63-1)
		if !ok {
			writeError(w, http.StatusBadRequest, "before must be a positive message id")
			return
		}
		limit, ok := positiveParam(q, "limit", 50, 100)
		if !ok {
			writeError(w, http.StatusBadRequest, "limit must be an integer from 1 to 100")
			return
		}
		msgs, err := store.Messages(r.Context(), before, int(limit))
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		page := messagePage{Messages: make([]messageJSON, len(msgs))}
		for i, m := range msgs {
			page.Messages[i] = messageJSON{Message: m.Text, Author: m.Author, ID: m.ID, Time: m.Time.UTC().Format(timeFormat)}
		}
		writeJSON(w, http.StatusOK, page)
	})
}

// positiveParam parses query parameter name as an integer in [1, most],
// returning def when it is absent.
func positiveParam(q url.Values, name string, def, most int64) (int64, bool) {
	if !q.Has(name) {
		return def, true
	}
	n, ok := parseUint(q.Get(name))
	return n, ok && n >= 1 && n <= most
}

// parseUint accepts only decimal digits: no sign, space or exponent.
func parseUint(s string) (int64, bool) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

func handleHealth(store *Store, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := store.Ping(ctx); err != nil {
			log.Error("health check failed", "err", err)
			writeError(w, http.StatusServiceUnavailable, "database unavailable")
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

const sessionCookie = "session"

// setSessionCookie sets the session cookie, or expires it when sid is "".
func setSessionCookie(w http.ResponseWriter, r *http.Request, sid string, ttl time.Duration) {
	c := &http.Cookie{
		Name:     sessionCookie,
		Value:    sid,
		Path:     "/",
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
		Secure:   requestScheme(r) == "https",
		MaxAge:   int(ttl / time.Second),
	}
	if sid == "" {
		c.MaxAge = -1 // sent as Max-Age=0
	}
	http.SetCookie(w, c)
}

// authenticate returns the user of the request's session, answering 422
// (no cookie) or 401 (unknown or expired session) itself. Each use slides
// the session, and the cookie with it.
func authenticate(w http.ResponseWriter, r *http.Request, sessions *Sessions, ttl time.Duration) (user, sid string, ok bool) {
	cookie, err := r.Cookie(sessionCookie)
	if err != nil || cookie.Value == "" {
		writeError(w, http.StatusUnprocessableEntity, "no session cookie")
		return "", "", false
	}
	user, ok = sessions.Lookup(cookie.Value)
	if !ok {
		writeError(w, http.StatusUnauthorized, "unknown or expired session")
		return "", "", false
	}
	setSessionCookie(w, r, cookie.Value, ttl)
	return user, cookie.Value, true
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

func firstHeaderValue(r *http.Request, name string) string {
	v, _, _ := strings.Cut(r.Header.Get(name), ",")
	return strings.TrimSpace(v)
}

// normalizeOrigin returns scheme://host in lower case without a default
// port, or "" when s is not an origin.
func normalizeOrigin(s string) string {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil || u.Scheme == "" || u.Host == "" {
		return ""
	}
	scheme, host := strings.ToLower(u.Scheme), strings.ToLower(u.Host)
	host = strings.TrimSuffix(host, map[string]string{"http": ":80", "https": ":443"}[scheme])
	return scheme + "://" + host
}

// originAllowed lets in requests without Origin (not from a browser), from
// the server's own origin, and from the configured extra origins.
func originAllowed(r *http.Request, allowed map[string]bool) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	o := normalizeOrigin(origin)
	if o == "" {
		return false
	}
	host := r.Host
	if h := firstHeaderValue(r, "X-Forwarded-Host"); h != "" {
		host = h
	}
	return o == normalizeOrigin(requestScheme(r)+"://"+host) || allowed[o]
}

func isWebSocketUpgrade(r *http.Request) bool {
	return r.ProtoMajor == 1 &&
		strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") &&
		r.Header.Get("Sec-WebSocket-Key") != "" &&
		r.Header.Get("Sec-WebSocket-Version") == "13"
}

// handleWebSocket upgrades /ws after checking, as plain HTTP with JSON
// errors, everything that can refuse it.
func handleWebSocket(d *deps) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, sid, ok := authenticate(w, r, d.sessions, d.cfg.SessionTTL)
		if !ok {
			return
		}
		if !originAllowed(r, d.cfg.AllowedOrigins) {
			writeError(w, http.StatusForbidden, "origin not allowed")
			return
		}
		if !isWebSocketUpgrade(r) {
			writeError(w, http.StatusBadRequest, "expected a WebSocket upgrade (HTTP/1.1, version 13)")
			return
		}
		since := int64(-1)
		if r.URL.Query().Has("since") {
			if since, ok = parseUint(r.URL.Query().Get("since")); !ok {
				writeError(w, http.StatusBadRequest, "since must be a non-negative integer")
				return
			}
		}
		c := newClient(d.hub, user, sid)
		switch d.hub.Reserve(c) {
		case reserveTaken:
			writeError(w, http.StatusConflict, "user already has an open WebSocket")
			return
		case reserveFull:
			writeError(w, http.StatusServiceUnavailable, "too many connections")
			return
		}
		if !d.sessions.OpenSocket(sid) {
			d.hub.Leave(c)
			writeError(w, http.StatusUnauthorized, "unknown or expired session")
			return
		}
		upgrade(d, c, w, r, since)
	})
}

// upgrade completes the handshake and starts the socket's reader. The HTTP
// handler then returns, so the request, its connection state and its
// buffers are freed: an idle socket costs only its reader goroutine, its
// client and small buffers.
func upgrade(d *deps, c *client, w http.ResponseWriter, r *http.Request, since int64) {
	uw := &upgradeWriter{ResponseWriter: w, oneFramePerWrite: !d.cfg.CoalesceWrites}
	hr := handshakeRequest(r)
	var ws *websocket.Conn
	websocket.Server{
		// Subprotocols are not offered; dropping the client's list also keeps
		// the library from refusing a handshake that names several.
		Handshake: func(cfg *websocket.Config, _ *http.Request) error {
			cfg.Protocol = nil
			return nil
		},
		Handler: func(conn *websocket.Conn) { ws = conn },
	}.ServeHTTP(uw, hr)
	hr.Header = nil // read by the handshake, kept by ws for nothing
	conn := uw.conn
	abandon := func() {
		d.hub.Leave(c)
		if conn != nil {
			conn.shut()
		}
		d.sessions.CloseSocket(c.session)
	}
	if ws == nil {
		abandon()
		return
	}
	ws.MaxPayloadBytes = maxFrameBytes
	d.hub.Activate(c, since)
	if err := conn.uncork(); err != nil {
		abandon()
		return
	}
	c.attach(conn)
	// Logged here, not by the reader: formatting a log line takes more stack
	// than reading does, and a goroutine's stack stays as large as it grew.
	d.log.Info("websocket open", "user", c.user, "remote", r.RemoteAddr)
	go serveSocket(d, c, ws, conn, r.RemoteAddr)
}

// serveSocket reads the socket until it closes, then releases it.
func serveSocket(d *deps, c *client, ws *websocket.Conn, conn *rawConn, remote string) {
	c.readLoop(ws, chatHandler(d, c))
	conn.shut()
	d.sessions.CloseSocket(c.session)
	d.log.Info("websocket closed", "user", c.user, "remote", remote)
}

// handshakeRequest copies what the WebSocket handshake reads from r. The
// websocket.Conn keeps its request for life; this keeps it small.
func handshakeRequest(r *http.Request) *http.Request {
	header := http.Header{}
	for _, name := range []string{"Upgrade", "Connection", "Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Protocol"} {
		if v := r.Header.Values(name); len(v) > 0 {
			header[name] = v
		}
	}
	return &http.Request{
		Method: r.Method, Proto: r.Proto, ProtoMajor: r.ProtoMajor, ProtoMinor: r.ProtoMinor,
		Host: r.Host, URL: &url.URL{Path: r.URL.Path}, Header: header, TLS: r.TLS, RemoteAddr: r.RemoteAddr,
	}
}

// chatHandler returns what c's reader does with each frame: refuse it with
// an error ack, or store it; the hub broadcasts and acks it once stored.
func chatHandler(d *deps, c *client) func(data []byte, binary bool) {
	rateKey := strings.ToLower(c.user)
	return func(data []byte, binary bool) {
		text, refusal := chatText(data, binary)
		if refusal != nil {
			c.send(refusal)
			return
		}
		if ok, _ := d.msgRate.Allow(rateKey); !ok {
			c.send(ackRateLimited)
			return
		}
		m := &Message{Author: c.user, Text: text, Time: time.Now()}
		err := d.store.SubmitMessage(m, func(err error) {
			if err != nil {
				d.log.Error("store message", "user", c.user, "err", err)
				c.send(ackStorageError)
				return
			}
			d.hub.Publish(*m, c)
		})
		if err != nil {
			c.send(ackStorageError)
		}
	}
}
