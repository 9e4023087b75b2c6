package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"
)

// Sessions maps session ids to users. A session expires after ttl without
// use; one with an open WebSocket does not expire while the socket lives.
// Expiry is decided on lookup, so an expired session is refused at once;
// the cleanup goroutine only frees memory and old rows.
//
// The map is the truth while the server runs. It is also written through to
// the database (only a hash of each id), so that a restart does not log
// everyone out: clients reconnect and carry on. Uses are saved in batches by
// the cleanup goroutine and at shutdown, not on every request.
type Sessions struct {
	ttl   time.Duration
	store SessionStore // nil: memory only

	mu sync.Mutex
	m  map[sessionKey]*session
}

// SessionStore is where sessions outlive the process.
type SessionStore interface {
	SaveSession(ctx context.Context, key []byte, user string, lastUsed time.Time) error
	DeleteSession(ctx context.Context, key []byte) error
	TouchSessions(ctx context.Context, used map[string]time.Time) error
	DeleteSessionsBefore(ctx context.Context, cutoff time.Time) error
	LoadSessions(ctx context.Context, since time.Time, each func(key []byte, user string, lastUsed time.Time)) error
}

// sessionKey is the SHA-256 of a session id: what the map and the database
// hold, so that neither a memory dump nor a copy of the database hands out
// live session ids.
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

// NewSessions returns an empty session map whose sessions live ttl, saved
// to store unless it is nil.
func NewSessions(ttl time.Duration, store SessionStore) *Sessions {
	return &Sessions{ttl: ttl, store: store, m: make(map[sessionKey]*session)}
}

// Load reads back the sessions that were live when the server stopped.
func (s *Sessions) Load(ctx context.Context) error {
	if s.store == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store.LoadSessions(ctx, time.Now().Add(-s.ttl), func(key []byte, user string, lastUsed time.Time) {
		s.m[sessionKey(key)] = &session{user: user, lastUsed: lastUsed}
	})
}

// Create starts a session for user and returns its id. The session is saved
// before Create returns.
func (s *Sessions) Create(ctx context.Context, user string) (string, error) {
	id, err := randomToken(32)
	if err != nil {
		return "", fmt.Errorf("new session: %w", err)
	}
	key, now := keyOf(id), time.Now()
	if s.store != nil {
		if err := s.store.SaveSession(ctx, key[:], user, now); err != nil {
			return "", fmt.Errorf("new session: %w", err)
		}
	}
	s.mu.Lock()
	s.m[key] = &session{user: user, lastUsed: now}
	s.mu.Unlock()
	return id, nil
}

// Lookup returns the user of a live session and refreshes its lifetime.
func (s *Sessions) Lookup(id string) (user string, ok bool) {
	key, now := keyOf(id), time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.m[key]
	if sess == nil {
		return "", false
	}
	if sess.expired(now, s.ttl) {
		delete(s.m, key)
		return "", false
	}
	sess.lastUsed, sess.unsaved = now, true
	return sess.user, true
}

// Delete ends a session. Unknown ids are ignored.
func (s *Sessions) Delete(ctx context.Context, id string) error {
	key := keyOf(id)
	s.mu.Lock()
	delete(s.m, key)
	s.mu.Unlock()
	if s.store == nil {
		return nil
	}
	if err := s.store.DeleteSession(ctx, key[:]); err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

// OpenSocket keeps a live session alive until the matching CloseSocket.
// It reports false when the session is gone or expired.
func (s *Sessions) OpenSocket(id string) bool {
	key, now := keyOf(id), time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.m[key]
	if sess == nil || sess.expired(now, s.ttl) {
		return false
	}
	sess.sockets++
	sess.lastUsed, sess.unsaved = now, true
	return true
}

// CloseSocket undoes OpenSocket; the session's ttl starts again from now.
func (s *Sessions) CloseSocket(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sess := s.m[keyOf(id)]; sess != nil && sess.sockets > 0 {
		sess.sockets--
		sess.lastUsed, sess.unsaved = time.Now(), true
	}
}

// Len returns the number of sessions held, expired or not.
func (s *Sessions) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// RunCleanup sweeps expired sessions and saves recent uses every interval
// until ctx is done.
func (s *Sessions) RunCleanup(ctx context.Context, interval time.Duration, onError func(error)) {
	every(ctx, interval, func(now time.Time) {
		if err := s.sweep(ctx, now); err != nil && ctx.Err() == nil {
			onError(err)
		}
	})
}

// sweep forgets expired sessions, saves the uses of the others (a session
// with an open socket counts as used now) and deletes expired rows.
func (s *Sessions) sweep(ctx context.Context, now time.Time) error {
	if err := s.save(ctx, now); err != nil || s.store == nil {
		return err
	}
	if err := s.store.DeleteSessionsBefore(ctx, now.Add(-s.ttl)); err != nil {
		return fmt.Errorf("delete expired sessions: %w", err)
	}
	return nil
}

// collect removes expired sessions and returns the last use of every live
// one that changed since the previous collect, by key.
func (s *Sessions) collect(now time.Time) map[string]time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	used := make(map[string]time.Time)
	for key, sess := range s.m {
		switch {
		case sess.expired(now, s.ttl):
			delete(s.m, key)
		case sess.sockets > 0:
			used[string(key[:])] = now
		case sess.unsaved:
			used[string(key[:])] = sess.lastUsed
		}
		sess.unsaved = false
	}
	return used
}

// Flush saves every session's last use, for a clean shutdown.
func (s *Sessions) Flush(ctx context.Context) error {
	return s.save(ctx, time.Now())
}

// save forgets expired sessions and saves the last use of the others.
func (s *Sessions) save(ctx context.Context, now time.Time) error {
	used := s.collect(now)
	if s.store == nil {
		return nil
	}
	if err := s.store.TouchSessions(ctx, used); err != nil {
		return fmt.Errorf("save sessions: %w", err)
	}
	return nil
}

const tokenAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomToken returns n characters [A-Za-z0-9] from crypto/rand, each
// uniformly chosen (bytes >= 248 are rejected to avoid modulo bias).
func randomToken(n int) (string, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, n+n/4)
	for len(out) < n {
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("random token: %w", err)
		}
		for _, b := range buf {
			if b >= 248 || len(out) == n {
				continue
			}
			out = append(out, tokenAlphabet[b%62])
		}
	}
	return string(out), nil
}
