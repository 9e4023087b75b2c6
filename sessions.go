package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"time"
)

// Sessions maps session ids to users. A session expires after ttl without
// use; one with an open WebSocket does not expire while the socket lives.
// Expiry is decided on lookup, so an expired session is refused at once;
// the cleanup goroutine only frees the memory of sessions nobody will use.
type Sessions struct {
	ttl time.Duration

	mu sync.Mutex
	m  map[string]*session
}

type session struct {
	user     string
	lastUsed time.Time
	sockets  int // open WebSockets; while > 0 the session does not expire
}

func (s *session) expired(now time.Time, ttl time.Duration) bool {
	return s.sockets == 0 && now.Sub(s.lastUsed) > ttl
}

// NewSessions returns an empty session map whose sessions live ttl.
func NewSessions(ttl time.Duration) *Sessions {
	return &Sessions{ttl: ttl, m: make(map[string]*session)}
}

// Create starts a session for user and returns its id.
func (s *Sessions) Create(user string) (string, error) {
	id, err := randomToken(32)
	if err != nil {
		return "", fmt.Errorf("new session: %w", err)
	}
	s.mu.Lock()
	s.m[id] = &session{user: user, lastUsed: time.Now()}
	s.mu.Unlock()
	return id, nil
}

// Lookup returns the user of a live session and refreshes its lifetime.
func (s *Sessions) Lookup(id string) (user string, ok bool) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.m[id]
	if sess == nil {
		return "", false
	}
	if sess.expired(now, s.ttl) {
		delete(s.m, id)
		return "", false
	}
	sess.lastUsed = now
	return sess.user, true
}

// Delete ends a session. Unknown ids are ignored.
func (s *Sessions) Delete(id string) {
	s.mu.Lock()
	delete(s.m, id)
	s.mu.Unlock()
}

// OpenSocket keeps a live session alive until the matching CloseSocket.
// It reports false when the session is gone or expired.
func (s *Sessions) OpenSocket(id string) bool {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.m[id]
	if sess == nil || sess.expired(now, s.ttl) {
		return false
	}
	sess.sockets++
	sess.lastUsed = now
	return true
}

// CloseSocket undoes OpenSocket; the session's ttl starts again from now.
func (s *Sessions) CloseSocket(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sess := s.m[id]; sess != nil && sess.sockets > 0 {
		sess.sockets--
		sess.lastUsed = time.Now()
	}
}

// Len returns the number of sessions held, expired or not.
func (s *Sessions) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// RunCleanup deletes expired sessions every interval until ctx is done.
func (s *Sessions) RunCleanup(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.sweep(now)
		}
	}
}

func (s *Sessions) sweep(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, sess := range s.m {
		if sess.expired(now, s.ttl) {
			delete(s.m, id)
		}
	}
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
