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
// The map is the truth while the server runs. Each new session is also
// written to the database (only a hash of its id), so that a restart does
// not log everyone out; uses are saved in batches by the cleanup goroutine
// and at shutdown, not on every request.
type Sessions struct {
	ttl   time.Duration
	now   func() time.Time // time.Now, or a clock a test sets
	store *Store

	mu sync.Mutex
	m  map[sessionKey]*session
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

// NewSessions returns the sessions saved in store that are still live.
func NewSessions(ctx context.Context, ttl time.Duration, now func() time.Time, store *Store) (*Sessions, error) {
	s := &Sessions{ttl: ttl, now: now, store: store, m: make(map[sessionKey]*session)}
	err := store.LoadSessions(ctx, now().Add(-ttl), func(key sessionKey, user string, lastUsed time.Time) {
		s.m[key] = &session{user: user, lastUsed: lastUsed}
	})
	return s, err
}

// Create starts a session for user and returns its id, saved before
// Create returns.
func (s *Sessions) Create(ctx context.Context, user string) (string, error) {
	id, err := randomToken(32)
	if err != nil {
		return "", fmt.Errorf("new session: %w", err)
	}
	key, now := keyOf(id), s.now()
	if err := s.store.SaveSession(ctx, key[:], user, now); err != nil {
		return "", fmt.Errorf("new session: %w", err)
	}
	s.mu.Lock()
	s.m[key] = &session{user: user, lastUsed: now}
	s.mu.Unlock()
	return id, nil
}

// Lookup returns the user of a live session and refreshes its lifetime.
func (s *Sessions) Lookup(id string) (user string, ok bool) {
	return s.use(id, 0)
}

// OpenSocket is Lookup for a WebSocket: the session stays alive until the
// matching CloseSocket.
func (s *Sessions) OpenSocket(id string) (user string, ok bool) {
	return s.use(id, 1)
}

// CloseSocket undoes OpenSocket; the session's ttl starts again from now.
func (s *Sessions) CloseSocket(id string) {
	s.use(id, -1)
}

// use refreshes a live session and adds sockets to its count of open ones.
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

// Delete ends a session. Unknown ids are ignored.
func (s *Sessions) Delete(ctx context.Context, id string) error {
	key := keyOf(id)
	s.mu.Lock()
	delete(s.m, key)
	s.mu.Unlock()
	if err := s.store.DeleteSession(ctx, key[:]); err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

// RunCleanup saves uses and forgets expired sessions every interval until
// ctx is done, and once more then.
func (s *Sessions) RunCleanup(ctx context.Context, interval time.Duration, onError func(error)) {
	every(ctx, interval, func() {
		if err := s.Save(ctx); err != nil && ctx.Err() == nil {
			onError(err)
		}
	})
}

// Save forgets expired sessions, deleting their rows, and saves the last
// use of the others; a session with an open socket counts as used now.
func (s *Sessions) Save(ctx context.Context) error {
	now := s.now()
	used := make(map[sessionKey]time.Time)
	s.mu.Lock()
	for key, sess := range s.m {
		switch {
		case sess.expired(now, s.ttl):
			delete(s.m, key)
		case sess.sockets > 0:
			used[key] = now
		case sess.unsaved:
			used[key] = sess.lastUsed
		}
		sess.unsaved = false
	}
	s.mu.Unlock()
	if err := s.store.SaveSessionUses(ctx, used, now.Add(-s.ttl)); err != nil {
		return fmt.Errorf("save sessions: %w", err)
	}
	return nil
}

// Len returns the number of sessions held, expired or not.
func (s *Sessions) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
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
			if b < 248 && len(out) < n {
				out = append(out, tokenAlphabet[b%62])
			}
		}
	}
	return string(out), nil
}
