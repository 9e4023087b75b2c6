package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const maxBodyBytes = 4 << 10

// routes returns the server's handler: the API on Go 1.22 method patterns,
// with the mux's own 404 and 405 answers turned into JSON errors.
func routes(cfg config, log *slog.Logger, store *Store, sessions *Sessions, hub *Hub, metrics *Metrics, lim limits) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /api/register", handleRegister(store, sessions, cfg.Admins, metrics, lim.auth, log))
	mux.Handle("POST /api/login", handleLogin(store, sessions, metrics, lim.auth, log))
	mux.Handle("GET /api/logout", handleLogout(sessions, hub, log))
	mux.Handle("POST /api/logout", handleLogout(sessions, hub, log))
	mux.Handle("GET /api/online", handleOnline(sessions, hub))
	mux.Handle("GET /api/user/{name}", handleUser(store, sessions, hub, cfg.Admins, log))
	mux.Handle("GET /api/messages", handleMessages(store, sessions, lim.reads, log))
	mux.Handle("DELETE /api/messages/{id}", handleDeleteMessage(sessions, hub, cfg.Admins, log))
	mux.Handle("GET /api/bans", handleBans(store, sessions, cfg.Admins, log))
	mux.Handle("POST /api/user/{name}/ban", handleBan(store, sessions, hub, cfg.Admins, log))
	mux.Handle("DELETE /api/user/{name}/ban", handleBan(store, sessions, hub, cfg.Admins, log))
	mux.Handle("GET /healthz", handleHealth(store, log))
	mux.Handle("GET /metrics", handleMetrics(metrics, hub, cfg.TrustedProxies))
	mux.Handle("GET /ws", handleWebSocket(sessions, hub, lim.opens, cfg.AllowedOrigins, cfg.PingInterval, cfg.WriteTimeout))
	mux.Handle("GET /{$}", handleStatic("index.html"))
	mux.Handle("GET /app.js", handleStatic("app.js"))
	mux.Handle("GET /style.css", handleStatic("style.css"))
	return trustProxies(cfg.TrustedProxies, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w = &statusRecorder{ResponseWriter: w, metrics: metrics}
		_, pattern := mux.Handler(r)
		switch mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); {
		case pattern == "":
			w = &errorRewriter{ResponseWriter: w}
		case (r.Method == http.MethodPost || r.Method == http.MethodDelete) && mt != "application/json":
			// No HTML form, from another site or another port of this one,
			// can send this type: no state changes on a visitor's behalf.
			writeError(w, http.StatusUnsupportedMediaType, "Content-Type must be application/json")
			return
		}
		mux.ServeHTTP(w, r)
	}))
}

// errorRewriter turns the mux's plain-text error answers into JSON ones.
type errorRewriter struct{ http.ResponseWriter }

func (e *errorRewriter) WriteHeader(status int) {
	writeError(e.ResponseWriter, status, strings.ToLower(http.StatusText(status)))
}

func (e *errorRewriter) Write(p []byte) (int, error) { return len(p), nil }

//go:embed web
var webFiles embed.FS

// handleStatic serves a file of the web client, kept to its own origin
// (the WebSocket named in full: not every browser counts ws: as 'self').
func handleStatic(name string) http.Handler {
	body, err := webFiles.ReadFile("web/" + name)
	if err != nil {
		panic(err) // embedded at build time: missing means a broken build
	}
	modified := time.Now()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws := strings.Replace(requestScheme(r), "http", "ws", 1) + "://" + requestHost(r) // ws: or wss:
		h := w.Header()
		h.Set("Content-Type", mime.TypeByExtension(path.Ext(name)))
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "+
			"connect-src 'self' "+ws+"; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		http.ServeContent(w, r, name, modified, bytes.NewReader(body))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(append(mustJSON(v), '\n'))
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// internalError logs err and answers 500 without revealing it.
func internalError(w http.ResponseWriter, log *slog.Logger, r *http.Request, err error) {
	log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	writeError(w, http.StatusInternalServerError, "internal error")
}

// bodyField returns the string of a body {"<name>": "<string>"}, answering
// 413 or 422 itself.
func bodyField(w http.ResponseWriter, r *http.Request, name string) (string, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", maxBodyBytes))
		return "", false
	}
	value, err := stringField(body, name)
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, fmt.Sprintf(`body must be {"%s": "<string>"}: %v`, name, err))
	}
	return value, err == nil
}

func validUsername(name string) bool {
	return len(name) >= 1 && len(name) <= 32 && strings.Trim(name,
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") == ""
}

func handleRegister(store *Store, sessions *Sessions, admins map[string]bool, metrics *Metrics, limit *rateLimiter, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !allowed(w, r, log, "registrations", limit, clientKey(r)) {
			return
		}
		name, ok := bodyField(w, r, "username")
		switch {
		case !ok:
			return
		case !validUsername(name):
			writeError(w, http.StatusBadRequest, "username must be 1 to 32 ASCII letters or digits")
			return
		case isAdmin(admins, name) && !clientAddr(r).IsLoopback(): // else a stranger could take it first
			writeError(w, http.StatusForbidden, "an admin's name is registered from the server itself")
			return
		}
		key := rand.Text() + rand.Text() // 52 characters, 260 random bits
		err := store.CreateUser(r.Context(), name, key)
		switch {
		case errors.Is(err, ErrNameTaken) && sessions.Banned(name):
			writeError(w, http.StatusForbidden, "banned")
		case errors.Is(err, ErrNameTaken):
			writeError(w, http.StatusConflict, "username already taken")
		case err != nil:
			internalError(w, log, r, err)
		default:
			log.Info("registered", "user", name, "client", clientAddr(r))
			metrics.Add("gochat_registrations_total", 1)
			writeJSON(w, http.StatusCreated, map[string]string{"key": key})
		}
	})
}

// handleLogin logs in. A wrong key costs a token of the client address's
// bucket, a right one a token of its user's: wrong keys at any rate from
// one address never keep the right ones of others there out.
func handleLogin(store *Store, sessions *Sessions, metrics *Metrics, limit *rateLimiter, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, ok := bodyField(w, r, "key")
		if !ok {
			return
		}
		user, err := store.UserByKey(r.Context(), key)
		bucket := "user " + strings.ToLower(user)
		if errors.Is(err, ErrNotFound) {
			bucket = clientKey(r)
		}
		if !allowed(w, r, log, "logins", limit, bucket) {
			return
		}
		sid := ""
		if err == nil {
			sid, err = sessions.Create(r.Context(), user)
		}
		switch {
		case errors.Is(err, ErrNotFound):
			log.Warn("login failed: unknown key", "client", clientAddr(r)) // never the key
			writeError(w, http.StatusUnauthorized, "unknown key")
		case errors.Is(err, errBanned):
			log.Warn("login failed: banned", "user", user, "client", clientAddr(r))
			writeError(w, http.StatusForbidden, "banned")
		case err != nil:
			internalError(w, log, r, err)
		default:
			metrics.Add("gochat_logins_total", 1)
			setSessionCookie(w, r, sid, sessions.ttl)
			writeJSON(w, http.StatusOK, map[string]string{"username": user})
		}
	})
}

func handleLogout(sessions *Sessions, hub *Hub, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A GET needs no JSON: a link or an <img> on another site, or on
		// another port of this host, would log the visitor out.
		if site := r.Header.Get("Sec-Fetch-Site"); site == "cross-site" || site == "same-site" {
			writeError(w, http.StatusForbidden, "a logout must come from this chat's own page")
			return
		}
		if cookie, err := r.Cookie(sessionCookie); err == nil {
			user, _ := sessions.Lookup(cookie.Value)
			if err := sessions.Delete(r.Context(), cookie.Value); err != nil {
				internalError(w, log, r, err)
				return
			}
			hub.send(kick{user, cookie.Value, closeNormal})
		}
		setSessionCookie(w, r, "", 0)
		writeJSON(w, http.StatusOK, struct{}{})
	})
}

func handleOnline(sessions *Sessions, hub *Hub) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := authenticate(w, r, sessions); ok {
			writeJSON(w, http.StatusOK, map[string][]string{"online_clients": hub.Online()})
		}
	})
}

// handleUser answers for /api/user/@me and for any registered name.
func handleUser(store *Store, sessions *Sessions, hub *Hub, admins map[string]bool, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name, _, ok := authenticate(w, r, sessions)
		if !ok {
			return
		}
		var err error
		if r.PathValue("name") != "@me" {
			name, err = store.UserByName(r.Context(), r.PathValue("name"))
		}
		switch {
		case errors.Is(err, ErrNotFound):
			writeError(w, http.StatusNotFound, "no such user")
		case err != nil:
			internalError(w, log, r, err)
		default:
			writeJSON(w, http.StatusOK, map[string]any{"username": name, "online": slices.Contains(hub.Online(), name),
				"admin": isAdmin(admins, name), "generation": store.generation})
		}
	})
}

func handleMessages(store *Store, sessions *Sessions, limit *rateLimiter, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, _, ok := authenticate(w, r, sessions)
		if !ok || !allowed(w, r, log, "reads", limit, strings.ToLower(user)) {
			return
		}
		before, ok1 := positiveParam(r.URL.Query(), "before", math.MaxInt64, math.MaxInt64)
		limit, ok2 := positiveParam(r.URL.Query(), "limit", 50, 100)
		if !ok1 || !ok2 {
			writeError(w, http.StatusBadRequest, "before must be a positive message id, limit an integer from 1 to 100")
			return
		}
		msgs, err := store.Messages(r.Context(), before, int(limit))
		if err != nil {
			internalError(w, log, r, err)
			return
		}
		page := make([]messageJSON, len(msgs))
		for i, m := range msgs {
			page[i] = toJSON(m, false)
		}
		writeJSON(w, http.StatusOK, map[string]any{"messages": page})
	})
}

// positiveParam parses query parameter name in [1, most], or returns def.
func positiveParam(q url.Values, name string, def, most int64) (int64, bool) {
	if !q.Has(name) {
		return def, true
	}
	n, ok := parseUint(q.Get(name))
	return n, ok && n >= 1 && n <= most
}

// parseUint accepts only decimal digits: no sign, space or exponent.
func parseUint(s string) (int64, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil && strings.Trim(s, "0123456789") == ""
}

// handleHealth answers 503 while the database cannot take a write, and
// logs the first failure of each outage.
func handleHealth(store *Store, log *slog.Logger) http.Handler {
	var failing atomic.Bool
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := store.Check(ctx); err != nil {
			if !failing.Swap(true) {
				log.Error("health check failed", "err", err)
			}
			writeError(w, http.StatusServiceUnavailable, "database unavailable")
			return
		}
		failing.Store(false)
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}
