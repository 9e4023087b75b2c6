package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Sessions maps session ids to users. A session expires after ttl without
// use, decided on lookup; one with an open WebSocket lives while it does.
// The map is the truth while the server runs; the database keeps a hash of
// each id, so that a restart logs no one out, and last uses in batches.
//
// Sessions also knows who is banned, so that a login's check of the ban and
// a ban's ending of sessions are one step under the lock: a login that
// races a ban either ends with it or is refused.
type Sessions struct {
	ttl   time.Duration
	now   func() time.Time // time.Now, or a clock a test sets
	store *Store

	mu      sync.Mutex
	m       map[sessionKey]*session
	perUser map[string]int  // sessions in m by user, so a login need not count them
	banned  map[string]bool // by lower-case name
}

// errBanned is returned by Sessions.Create for a banned user.
var errBanned = errors.New("banned")

// sessionKey is the SHA-256 of a session id, all the map and the database
// hold: neither a memory dump nor a copy of the database hands out ids.
type sessionKey [sha256.Size]byte

func keyOf(id string) sessionKey { return sha256.Sum256([]byte(id)) }

type session struct {
	user     string
	lastUsed time.Time
	sockets  int  // open WebSockets; while > 0 the session does not expire
	unsaved  bool // used since its lastUsed was last saved
}

func (s *session) expired(now time.Time, ttl time.Duration) bool {
	return s.sockets == 0 && now.Sub(s.lastUsed) > ttl
}

// NewSessions loads the live sessions of users not banned.
func NewSessions(ctx context.Context, ttl time.Duration, now func() time.Time, store *Store) (*Sessions, error) {
	s := &Sessions{ttl: ttl, now: now, store: store, m: map[sessionKey]*session{}, perUser: map[string]int{}, banned: map[string]bool{}}
	err := store.LoadSessions(ctx, now().Add(-ttl), func(key sessionKey, user string, lastUsed time.Time) {
		s.add(key, &session{user: user, lastUsed: lastUsed})
	})
	bans, err2 := store.Bans(ctx)
	for _, name := range bans {
		s.banned[strings.ToLower(name)] = true
	}
	return s, errors.Join(err, err2)
}

// Create starts and saves a session for user and returns its id.
func (s *Sessions) Create(ctx context.Context, user string) (string, error) {
	id := (rand.Text() + rand.Text())[:32] // [A-Z2-7]: 160 random bits
	key, now := keyOf(id), s.now()
	if err := s.store.SaveSession(ctx, key, user, now); err != nil {
		return "", fmt.Errorf("new session: %w", err)
	}
	s.mu.Lock()
	banned := s.banned[strings.ToLower(user)]
	ended := []sessionKey{key} // a banned user's new session ends at once
	if !banned {
		s.add(key, &session{user: user, lastUsed: now})
		ended = s.trim(user)
	}
	s.mu.Unlock()
	for _, key := range ended {
		if err := s.store.DeleteSession(ctx, key); err != nil {
			return "", fmt.Errorf("end old session: %w", err)
		}
	}
	if banned {
		return "", errBanned
	}
	return id, nil
}

// maxSessionsPerUser bounds what one account's logins cost: one more ends
// the user's least recently used session.
const maxSessionsPerUser = 20

// trim ends user's least recently used sessions beyond maxSessionsPerUser,
// never one with an open socket, and returns their keys.
func (s *Sessions) trim(user string) []sessionKey {
	if s.perUser[user] <= maxSessionsPerUser {
		return nil
	}
	var idle []sessionKey
	n := 0
	for key, sess := range s.m {
		if sess.user == user {
			if n++; sess.sockets == 0 {
				idle = append(idle, key)
			}
		}
	}
	excess := min(n-maxSessionsPerUser, len(idle)) // n > maxSessionsPerUser
	slices.SortFunc(idle, func(a, b sessionKey) int { return s.m[a].lastUsed.Compare(s.m[b].lastUsed) })
	for _, key := range idle[:excess] {
		s.remove(key)
	}
	return idle[:excess]
}

func (s *Sessions) add(key sessionKey, sess *session) {
	s.m[key] = sess
	s.perUser[sess.user]++
}

func (s *Sessions) remove(key sessionKey) {
	if sess := s.m[key]; sess != nil {
		delete(s.m, key)
		if s.perUser[sess.user]--; s.perUser[sess.user] == 0 {
			delete(s.perUser, sess.user)
		}
	}
}

// Lookup returns the user of a live session and refreshes its lifetime.
func (s *Sessions) Lookup(id string) (user string, ok bool) { return s.use(id, 0) }

// OpenSocket is Lookup for a WebSocket: the session lives until CloseSocket.
func (s *Sessions) OpenSocket(id string) (user string, ok bool) { return s.use(id, 1) }

// CloseSocket undoes OpenSocket.
func (s *Sessions) CloseSocket(id string) { s.use(id, -1) }

func (s *Sessions) use(id string, sockets int) (string, bool) {
	key, now := keyOf(id), s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.m[key]
	if sess == nil || sess.expired(now, s.ttl) {
		return "", false
	}
	sess.sockets += sockets
	sess.lastUsed, sess.unsaved = now, true
	return sess.user, true
}

// SetBanned bans user, ending their sessions, or lifts the ban; the
// database first, so that a failed ban changes nothing.
func (s *Sessions) SetBanned(ctx context.Context, user string, banned bool) error {
	if err := s.store.SetBanned(ctx, user, banned); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.banned[strings.ToLower(user)] = banned
	for key, sess := range s.m {
		if banned && strings.EqualFold(sess.user, user) {
			s.remove(key)
		}
	}
	return nil
}

// Banned reports whether name is banned, in any letter case.
func (s *Sessions) Banned(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.banned[strings.ToLower(name)]
}

// Delete ends a session, its row first: a failed logout changes nothing.
func (s *Sessions) Delete(ctx context.Context, id string) error {
	key := keyOf(id)
	if err := s.store.DeleteSession(ctx, key); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.remove(key)
	return nil
}

// Save forgets expired sessions and saves the last use of the others; one
// with an open socket counts as used now.
func (s *Sessions) Save(ctx context.Context) error {
	now := s.now()
	used := make(map[sessionKey]time.Time)
	s.mu.Lock()
	for key, sess := range s.m {
		switch {
		case sess.expired(now, s.ttl):
			s.remove(key)
		case sess.sockets > 0:
			used[key] = now
		case sess.unsaved:
			used[key] = sess.lastUsed
		}
		sess.unsaved = false
	}
	s.mu.Unlock()
	return s.store.SaveSessionUses(used, now.Add(-s.ttl))
}

// SaveSession stores a new session.
func (s *Store) SaveSession(ctx context.Context, key sessionKey, user string, lastUsed time.Time) error {
	_, err := s.db.ExecContext(ctx, `INSERT OR REPLACE INTO sessions(key, username, last_used) VALUES(?, ?, ?)`,
		key[:], user, lastUsed.UnixNano())
	return err
}

// DeleteSession removes a session.
func (s *Store) DeleteSession(ctx context.Context, key sessionKey) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM sessions WHERE key = ?`, key[:])
	return err
}

// SaveSessionUses records last uses and deletes those unused since cutoff.
func (s *Store) SaveSessionUses(used map[sessionKey]time.Time, cutoff time.Time) error {
	return s.inTx(func(tx *sql.Tx) error {
		for key, at := range used {
			if _, err := tx.Exec(`UPDATE sessions SET last_used = max(last_used, ?) WHERE key = ?`, at.UnixNano(), key[:]); err != nil {
				return err
			}
		}
		_, err := tx.Exec(`DELETE FROM sessions WHERE last_used < ?`, cutoff.UnixNano())
		return err
	})
}

// LoadSessions calls each for every session used since since, but those
// of banned users: a login that raced a ban may have left a row.
func (s *Store) LoadSessions(ctx context.Context, since time.Time, each func(sessionKey, string, time.Time)) error {
	rows, err := s.db.QueryContext(ctx, `SELECT key, username, last_used FROM sessions WHERE last_used >= ?
		AND NOT EXISTS (SELECT 1 FROM bans WHERE bans.username = sessions.username)`, since.UnixNano())
	if err != nil {
		return fmt.Errorf("load sessions: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var key []byte
		var user string
		var nanos int64
		if err := rows.Scan(&key, &user, &nanos); err != nil {
			return fmt.Errorf("load sessions: %w", err)
		}
		if len(key) == len(sessionKey{}) {
			each(sessionKey(key), user, time.Unix(0, nanos))
		}
	}
	return rows.Err()
}

const sessionCookie = "session"

// setSessionCookie sets the session cookie, or expires it when sid is "".
func setSessionCookie(w http.ResponseWriter, r *http.Request, sid string, ttl time.Duration) {
	maxAge := int(ttl / time.Second)
	if sid == "" {
		maxAge = -1 // sent as Max-Age=0
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: sid, Path: "/", MaxAge: maxAge,
		HttpOnly: true, SameSite: http.SameSiteLaxMode, Secure: requestScheme(r) == "https"})
}

// authenticate returns the user of the request's session, answering 422
// (no cookie) or 401 itself. Each use slides the session and its cookie.
func authenticate(w http.ResponseWriter, r *http.Request, sessions *Sessions) (user, sid string, ok bool) {
	cookie, err := r.Cookie(sessionCookie)
	if err != nil || cookie.Value == "" {
		writeError(w, http.StatusUnprocessableEntity, "no session cookie")
		return "", "", false
	}
	if user, ok = sessions.Lookup(cookie.Value); !ok {
		writeError(w, http.StatusUnauthorized, "unknown or expired session")
		return "", "", false
	}
	setSessionCookie(w, r, cookie.Value, sessions.ttl)
	return user, cookie.Value, true
}
