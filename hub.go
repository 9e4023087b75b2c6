package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"
)

// Hub is the room's one sequencer: every change to the room is an event on
// one channel, applied by one goroutine in arrival order, so no two changes
// race and everyone sees one order. The hub queues frames for the write
// pumps and never writes to a socket; it does wait for the database.
//
// A client leaves the room, after everything its reader queued before:
//   - when it closes, its connection ends or it breaks the protocol (left);
//   - silent for two ping intervals, or for probeTimeout after a 409 probed
//     it (left, 1008, from its reader);
//   - when its write takes nothing for -write-timeout (left, 1008, from its pump);
//   - when its queue passes maxQueueBytes (dropped by the hub, 1008);
//   - when its session logs out (kick, 1000) or its user is banned (kick,
//     1008), or the user takes over on another connection (reserve, 4000);
//   - when the server shuts down (shutdown, 1001).
//
// Its frames that reach the hub after that are dropped unseen.
type Hub struct {
	events  chan event
	done    chan struct{}
	sockets sync.WaitGroup // one per reserved client, until its socket ends

	store                        *Store
	limit                        *rateLimiter // chat messages per user
	sessions                     *Sessions
	now                          func() time.Time
	metrics                      *Metrics
	log                          *slog.Logger
	history, replayMax, maxConns int // messages replayed to a plain connect, to ?since=; sockets

	// Owned by the hub goroutine.
	clients map[string]*client // by lower-case user name: reserved or in the room
	lastID  int64              // highest message id ever stored
	slow    []*client          // queue full: dropped at the end of the step
}

// event is one of these, or a clientFrame (protocol.go).
type event any

type (
	reserve struct { // the user's one slot, before the upgrade, unseen by the room
		c        *client
		takeover bool // close the user's socket, if any, instead of refusing
		result   chan error
	}
	joined struct { // the handshake succeeded: into the room, with its replay
		c     *client
		since int64 // replay after this id; < 0: the last -history messages
	}
	left struct {
		c    *client
		code int
	}
	kick struct { // a logout (that session's socket) or a ban (session "")
		user, session string
		code          int
	}
	deletion struct {
		id     int64
		author string // only this author's message; "": any (an admin)
		result chan error
	}
	retention struct { // deletes up to retireBatch messages older than before or beyond the newest keep
		before  time.Time
		keep    int
		deleted chan int64 // how many; -1: the database failed
	}
	onlineQuery chan []string
	shutdown    struct{ code int }
)

var (
	errTaken    = errors.New("user already has an open WebSocket")
	errFull     = errors.New("too many connections")
	errExpired  = errors.New("unknown or expired session")
	errShutdown = errors.New("shutting down")
)

// NewHub starts the hub.
func NewHub(ctx context.Context, cfg config, store *Store, sessions *Sessions, metrics *Metrics, log *slog.Logger) (*Hub, error) {
	lastID, err := store.LastMessageID(ctx)
	if err != nil {
		return nil, err
	}
	h := &Hub{events: make(chan event, 2*maxStep), done: make(chan struct{}), store: store, sessions: sessions,
		limit: newRateLimiter(cfg.MsgRate, cfg.MsgBurst, cfg.now),
		now:   cfg.now, metrics: metrics, log: log, history: cfg.History, replayMax: cfg.ReplayMax, maxConns: cfg.MaxConns,
		clients: make(map[string]*client), lastID: lastID}
	go h.run()
	return h, nil
}

// maxStep bounds the events one step takes, and so one commit's messages.
const maxStep = 512

func (h *Hub) run() {
	defer close(h.done)
	for {
		step := []event{<-h.events}
		for len(step) < maxStep && len(h.events) > 0 { // all that waits
			step = append(step, <-h.events)
		}
		if !h.handle(step) {
			return
		}
	}
}

// handle applies events in order; a run of client frames is delivered
// together, so that its messages share one commit. It reports false after
// a shutdown.
func (h *Hub) handle(events []event) bool {
	var frames []clientFrame
	for _, e := range events {
		if f, ok := e.(clientFrame); ok {
			if c := f.sender(); h.clients[c.key] == c && c.inRoom {
				frames = append(frames, f)
			}
			continue
		}
		h.deliver(frames)
		frames = nil
		if !h.apply(e) {
			return false
		}
	}
	h.deliver(frames)
	return true
}

// apply applies an event that is not a client's frame.
func (h *Hub) apply(e event) bool {
	switch e := e.(type) {
	case reserve:
		e.result <- h.reserve(e.c, e.takeover)
	case joined:
		h.admit(e.c, e.since)
	case left:
		h.remove(e.c, e.code)
	case kick:
		if c := h.clients[strings.ToLower(e.user)]; c != nil && (e.session == "" || c.session == e.session) {
			if e.session == "" { // a ban: say why, before the close
				h.queue(c, eventFrame("banned", c.user))
			}
			h.remove(c, e.code)
		}
	case deletion: // after the message's broadcast, in an earlier step
		err := h.store.DeleteMessage(context.Background(), e.id, e.author)
		if err == nil {
			h.broadcast(deleteFrame(e.id), nil)
		}
		e.result <- err
	case retention:
		n, err := h.store.Retire(e.before, e.keep)
		if err != nil {
			h.log.Error("retention", "err", err)
			n = -1
		}
		e.deleted <- n
	case onlineQuery:
		e <- h.online()
	case shutdown:
		h.closeAll(e.code)
		return false
	default:
		panic(fmt.Sprintf("hub: no case for event %T", e))
	}
	h.dropSlow()
	return true
}

// reserve takes c's user's slot, unless c's session ended since its
// request was checked (a logout or a ban: then nothing is touched), the
// user has a socket already (a takeover closes that one, in the same
// step), or the server is full.
func (h *Hub) reserve(c *client, takeover bool) error {
	old := h.clients[c.key]
	switch {
	case old != nil && !takeover:
		old.startProbe()
		return errTaken
	case old == nil && len(h.clients) >= h.maxConns:
		return errFull
	}
	if _, ok := h.sessions.OpenSocket(c.session); !ok {
		return errExpired
	}
	if old != nil {
		h.remove(old, closeReplaced)
	}
	h.clients[c.key] = c
	h.sockets.Add(1)
	return nil
}

// admit lets a reserved client into the room with its replay, read from
// the database in the same step: the hub is the only writer of messages,
// so the client misses and repeats nothing.
func (h *Hub) admit(c *client, since int64) {
	if h.clients[c.key] != c {
		return // kicked before its handshake ended
	}
	c.inRoom = true
	replay := since >= 0 && since <= h.lastID // beyond the newest: from before a restore
	after, limit := int64(0), h.history
	if replay {
		after, limit = since, h.replayMax
	}
	msgs, err := h.store.Replay(after, limit, replay)
	if err != nil {
		h.log.Error("replay", "user", c.user, "err", err)
	}
	// Deleted messages keep their ids as tombstones, so a hole after since
	// is retention's, or beyond replayMax.
	if since > h.lastID || replay && (len(msgs) == 0 && since < h.lastID || len(msgs) > 0 && msgs[0].ID > since+1) {
		h.queue(c, gapFrame(h.store.generation))
	}
	for _, m := range msgs {
		if !m.Deleted {
			h.queue(c, messageFrame(m, true))
		}
	}
	h.broadcast(eventFrame("join", c.user), c)
}

func (h *Hub) online() []string {
	names := []string{}
	for _, c := range h.clients {
		if c.inRoom {
			names = append(names, c.user)
		}
	}
	sort.Strings(names)
	return names
}

// queue queues frame for c, if c is still here.
func (h *Hub) queue(c *client, frame []byte) {
	if h.clients[c.key] == c && !c.enqueue(frame) {
		h.slow = append(h.slow, c)
	}
}

// broadcast queues frame for everyone in the room but except.
func (h *Hub) broadcast(frame []byte, except *client) {
	for _, c := range h.clients {
		if c != except && c.inRoom && !c.enqueue(frame) {
			h.slow = append(h.slow, c)
		}
	}
}

// dropSlow drops the clients whose queue filled up, at the end of the
// step, so that the step's frames, theirs included, come before the leave.
func (h *Hub) dropSlow() {
	for len(h.slow) > 0 {
		c := h.slow[0]
		h.slow = h.slow[1:]
		if h.clients[c.key] == c {
			h.log.Warn("dropping slow websocket client", "user", c.user)
			h.metrics.Add(`gochat_clients_dropped_total{reason="slow"}`, 1)
			c.discardQueue()
			h.remove(c, closePolicyViolation)
		}
	}
}

// remove takes c out, frees its session to expire, closes its socket with
// code after what is queued, and tells the others.
func (h *Hub) remove(c *client, code int) {
	if h.clients[c.key] != c {
		return
	}
	delete(h.clients, c.key)
	h.sessions.CloseSocket(c.session)
	c.close(code)
	if c.inRoom {
		h.broadcast(eventFrame("leave", c.user), nil)
	}
}

// closeAll tells everyone that the others leave, then closes every socket
// with code. Beyond shutdownLeaveLimit the close frame alone says it.
func (h *Hub) closeAll(code int) {
	for _, c := range h.clients {
		if c.inRoom && len(h.clients) <= shutdownLeaveLimit {
			h.broadcast(eventFrame("leave", c.user), c)
		}
	}
	for _, c := range h.clients {
		c.close(code)
	}
	clear(h.clients)
}

const shutdownLeaveLimit = 1000

// send puts e on the hub's one ordered path, unless the hub has stopped.
func (h *Hub) send(e event) bool {
	select {
	case h.events <- e:
		return true
	case <-h.done:
		return false
	}
}

// ask sends e, which carries result, and waits for the answer.
func (h *Hub) ask(e event, result chan error) error {
	if !h.send(e) {
		return errShutdown
	}
	return <-result
}

// Online returns the names of the users in the room, sorted.
func (h *Hub) Online() []string {
	reply := make(onlineQuery, 1)
	if !h.send(reply) {
		return []string{}
	}
	return <-reply
}

// Shutdown closes every socket with code and waits for them until ctx ends.
func (h *Hub) Shutdown(ctx context.Context, code int) {
	h.send(shutdown{code})
	<-h.done
	finished := make(chan struct{})
	go func() { h.sockets.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
	}
}
