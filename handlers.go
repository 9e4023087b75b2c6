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
	"slices"
	"strconv"
	"strings"
	"time"
)

const maxBodyBytes = 4 << 10

// routes returns the server's handler: the API on Go 1.22 method patterns,
// with the mux's own 404 and 405 answers turned into JSON errors.
func routes(cfg config, log *slog.Logger, store *Store, sessions *Sessions, hub *Hub, chat *chat, authRate *rateLimiter) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /api/register", limitAuth(authRate, cfg.TrustedProxies, handleRegister(store, log)))
	mux.Handle("POST /api/login", limitAuth(authRate, cfg.TrustedProxies, handleLogin(store, sessions, log)))
	mux.Handle("GET /api/logout", handleLogout(sessions, hub, log))
	mux.Handle("POST /api/logout", handleLogout(sessions, hub, log))
	mux.Handle("GET /api/online", handleOnline(sessions, hub))
	mux.Handle("GET /api/user/@me", handleMe(sessions, hub))
	mux.Handle("GET /api/user/{name}", handleUser(store, sessions, hub, log))
	mux.Handle("GET /api/messages", handleMessages(store, sessions, log))
	mux.Handle("GET /healthz", handleHealth(store, log))
	mux.Handle("GET /ws", handleWebSocket(sessions, chat, cfg.AllowedOrigins, cfg.PingInterval))
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

func handleLogin(store *Store, sessions *Sessions, log *slog.Logger) http.Handler {
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
		setSessionCookie(w, r, sid, sessions.ttl)
		writeJSON(w, http.StatusOK, map[string]string{"username": user})
	})
}

func handleLogout(sessions *Sessions, hub *Hub, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if cookie, err := r.Cookie(sessionCookie); err == nil {
			if user, ok := sessions.Lookup(cookie.Value); ok {
				hub.Kick(user, cookie.Value, closeNormal)
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

func handleOnline(sessions *Sessions, hub *Hub) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions); !ok {
			return
		}
		writeJSON(w, http.StatusOK, map[string][]string{"online_clients": hub.Online()})
	})
}

type userJSON struct {
	Username string `json:"username"`
	Online   bool   `json:"online"`
}

func handleMe(sessions *Sessions, hub *Hub) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, _, ok := authenticate(w, r, sessions)
		if !ok {
			return
		}
		writeJSON(w, http.StatusOK, userJSON{user, slices.Contains(hub.Online(), user)})
	})
}

func handleUser(store *Store, sessions *Sessions, hub *Hub, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions); !ok {
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
		writeJSON(w, http.StatusOK, userJSON{name, slices.Contains(hub.Online(), name)})
	})
}

type messagePage struct {
	Messages []messageJSON `json:"messages"`
}

func handleMessages(store *Store, sessions *Sessions, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions); !ok {
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
			page.Messages[i] = toJSON(m, false)
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
func authenticate(w http.ResponseWriter, r *http.Request, sessions *Sessions) (user, sid string, ok bool) {
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
	setSessionCookie(w, r, cookie.Value, sessions.ttl)
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

// handleWebSocket checks, as plain HTTP with JSON errors, everything that
// can refuse /ws, then registers the client and serves its socket.
func handleWebSocket(sessions *Sessions, chat *chat, origins map[string]bool, ping time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, sid, ok := authenticate(w, r, sessions)
		if !ok {
			return
		}
		if !originAllowed(r, origins) {
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
		if _, ok := sessions.OpenSocket(sid); !ok {
			writeError(w, http.StatusUnauthorized, "unknown or expired session")
			return
		}
		c := newClient(user, sid)
		err := chat.hub.Register(c, since)
		if err != nil {
			sessions.CloseSocket(sid)
		}
		switch err {
		case errTaken:
			writeError(w, http.StatusConflict, err.Error())
		case errFull:
			writeError(w, http.StatusServiceUnavailable, err.Error())
		default:
			serveSocket(w, r, c, chat, ping)
		}
	})
}
