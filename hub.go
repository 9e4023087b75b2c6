package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// Hub is the room's one sequencer. Every change to the room is an event
// on one channel, and the hub's goroutine (run) handles them one at a
// time, in the order they arrived: a client's frames (protocol.go), its
// joining and leaving, kicks, deletions, retention. So no two of them can
// race: a message is stored, acked and broadcast in one step, which no
// deletion or kick can come between; a client's acks leave in the order
// of its frames; everyone sees the same order.
//
// A client leaves the room in one of these ways, each an event handled
// after everything its reader had queued before:
//   - it closes, its connection ends, or it breaks the protocol (left,
//     from its reader);
//   - it is silent for two ping intervals, or for probeTimeout after a 409
//     probed it (left, 1008, from its reader);
//   - its write stalls for writeTimeout (left, 1008, from its write pump);
//   - its queue passes maxQueueBytes (dropped by the hub, 1008);
//   - its session logs out (kick, 1000) or its user is banned (kick, 1008);
//   - the server shuts down (shutdown, 1001).
//
// Frames a client sent that reach the hub after it left are dropped: not
// stored, not acked, not broadcast.
//
// The hub never writes to a socket: it queues frames for clients, whose
// write pumps do the writing. It does wait for the database, to commit the
// messages of each step in one transaction before delivering them.
type Hub struct {
	events  chan event
	done    chan struct{}
	sockets sync.WaitGroup // one per reserved client, until its socket ends

	store     *Store
	sessions  *Sessions
	now       func() time.Time
	metrics   *Metrics
	log       *slog.Logger
	history   int // messages replayed to a plain connect
	replayMax int // messages replayed to a connect with ?since=
	maxConns  int

	// Owned by the hub goroutine.
	clients map[string]*client // by lower-case user name: reserved or in the room
	recent  []Message          // newest stored messages, ascending id
	lastID  int64              // highest message id ever stored
	slow    []*client          // queue full: dropped at the end of the step
}

// event is what the hub's channel carries: one of the types below, or one
// born of a client's frame (clientFrame, protocol.go).
type event any

type (
	// reserve takes the user's one slot before the upgrade, unseen by the
	// room, so that a second socket is refused with a 409 body.
	reserve struct {
		c      *client
		result chan error
	}
	// joined enters a reserved client into the room once its handshake
	// succeeded, and queues its replay: the last -history messages when
	// since < 0, else those after since.
	joined struct {
		c     *client
		since int64
	}
	// left takes a client out after everything its reader sent before.
	left struct {
		c    *client
		code int
	}
	// kick ends the socket of user opened with session, or any of its
	// sockets when session is "" (a ban).
	kick struct {
		user, session string
		code          int
	}
	// deletion wipes a stored message and tells everyone.
	deletion struct {
		id     int64
		result chan error
	}
	// forget stops replaying the ids up to through, which retention deletes.
	forget      struct{ through int64 }
	onlineQuery chan []string
	shutdown    struct{ code int }
)

var (
	errTaken   = errors.New("user already has an open WebSocket")
	errFull    = errors.New("too many connections")
	errExpired = errors.New("unknown or expired session")
)

// NewHub starts the hub with the newest stored messages for replays.
func NewHub(ctx context.Context, cfg config, store *Store, sessions *Sessions, metrics *Metrics, log *slog.Logger) (*Hub, error) {
	recent, err := store.Messages(ctx, 0, max(cfg.History, cfg.ReplayMax), true)
	if err != nil {
		return nil, err
	}
	lastID, err := store.LastMessageID(ctx)
	if err != nil {
		return nil, err
	}
	h := &Hub{events: make(chan event, 2*maxStep), done: make(chan struct{}), store: store, sessions: sessions,
		now: cfg.now, metrics: metrics, log: log, history: cfg.History, replayMax: cfg.ReplayMax, maxConns: cfg.MaxConns,
		clients: make(map[string]*client), recent: recent, lastID: lastID}
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

// handle handles events in order. A run of client frames is taken
// together, so that the messages among them share one commit; any other
// event first finishes that run. It reports false after a shutdown.
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

// deliver stores the messages among frames in one transaction, then does
// what each frame means, in order.
func (h *Hub) deliver(frames []clientFrame) {
	var msgs []*Message
	now := h.now()
	for _, f := range frames {
		if m, ok := f.(*chatMessage); ok {
			m.msg = Message{Author: m.from.user, Text: m.text, Time: now}
			msgs = append(msgs, &m.msg)
		}
	}
	err := h.store.AddMessages(msgs)
	if err != nil {
		h.log.Error("store messages", "count", len(msgs), "err", err)
	}
	for _, f := range frames {
		switch f := f.(type) {
		case *chatMessage:
			if err != nil {
				h.refuse(f.from, "storage_error")
			} else {
				h.publish(f.from, f.msg)
			}
		case refusal:
			h.refuse(f.from, f.code)
		case typing:
			if now.Sub(f.from.typedAt) >= typingEvery {
				f.from.typedAt = now
				h.broadcast(eventFrame("typing", f.from.user), f.from)
			}
		}
	}
	h.dropSlow()
}

// publish sends a stored message to everyone but its sender, who gets the
// ack, and keeps it for replays.
func (h *Hub) publish(from *client, m Message) {
	h.recent = append(h.recent, m)
	if keep := max(h.history, h.replayMax); len(h.recent) > 2*keep {
		// Copying at twice the size keeps appends amortised O(1).
		h.recent = slices.Clone(h.recent[len(h.recent)-keep:])
	}
	h.lastID = m.ID
	h.metrics.Add("gochat_messages_accepted_total", 1)
	h.metrics.Add("gochat_deliveries_total", int64(len(h.clients)-1))
	h.broadcast(messageFrame(m, false), from)
	h.queue(from, ackFrame(m.ID))
}

func (h *Hub) refuse(c *client, code string) {
	h.metrics.Add(fmt.Sprintf(`gochat_messages_refused_total{code="%s"}`, code), 1)
	h.queue(c, errorAck(code))
}

// apply handles an event that is not a client's frame. It reports false
// after a shutdown.
func (h *Hub) apply(e event) bool {
	switch e := e.(type) {
	case reserve:
		e.result <- h.reserve(e.c)
	case joined:
		h.admit(e.c, e.since)
	case left:
		h.remove(e.c, e.code)
	case kick:
		if c := h.clients[strings.ToLower(e.user)]; c != nil && (e.session == "" || c.session == e.session) {
			h.remove(c, e.code)
		}
	case deletion:
		e.result <- h.delete(e.id)
	case forget:
		h.recent = slices.DeleteFunc(h.recent, func(m Message) bool { return m.ID <= e.through })
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

// reserve takes c's user's slot, unless the user has a socket already, the
// server is full, or c's session ended (a logout or a ban since its
// request was checked). The session then stays alive while the socket
// does.
func (h *Hub) reserve(c *client) error {
	if old := h.clients[c.key]; old != nil {
		old.startProbe()
		return errTaken
	}
	if len(h.clients) >= h.maxConns {
		return errFull
	}
	if _, ok := h.sessions.OpenSocket(c.session); !ok {
		return errExpired
	}
	h.clients[c.key] = c
	h.sockets.Add(1)
	return nil
}

// admit lets a reserved client into the room and queues its replay in the
// same step, so that it misses and repeats nothing. Others hear of the
// join after it.
func (h *Hub) admit(c *client, since int64) {
	if h.clients[c.key] != c {
		return // kicked before its handshake ended
	}
	c.inRoom = true
	msgs := h.recent[max(0, len(h.recent)-h.history):]
	if since >= 0 {
		i := sort.Search(len(h.recent), func(i int) bool { return h.recent[i].ID > since })
		msgs = h.recent[max(i, len(h.recent)-h.replayMax):]
		// Ids have no holes, so one between since and the first replayed
		// message was deleted or is beyond replayMax.
		if len(msgs) == 0 && since < h.lastID || len(msgs) > 0 && msgs[0].ID > since+1 {
			h.queue(c, gapFrame)
		}
	}
	for _, m := range msgs {
		if !m.Deleted {
			h.queue(c, messageFrame(m, true))
		}
	}
	h.broadcast(eventFrame("join", c.user), c)
}

// delete wipes message id in storage and in the replays, and tells
// everyone. Its broadcast, if any, went out in an earlier step.
func (h *Hub) delete(id int64) error {
	if err := h.store.DeleteMessage(context.Background(), id); err != nil {
		return err
	}
	if i, found := slices.BinarySearchFunc(h.recent, id, func(m Message, id int64) int { return cmp.Compare(m.ID, id) }); found {
		h.recent[i] = Message{ID: id, Deleted: true}
	}
	h.broadcast(deleteFrame(id), nil)
	return nil
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

// dropSlow drops the clients whose queue filled up in this step. It runs
// at the end of the step, so that every frame of the step, a slow
// client's own messages included, comes before its leave.
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

// closeAll tells everyone that the others are leaving and closes every
// socket with code. Beyond shutdownLeaveLimit clients that is a frame for
// too many pairs, and the close frame alone says it.
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

// Reserve takes the slot of c's user for a socket about to open.
func (h *Hub) Reserve(c *client) error {
	r := reserve{c, make(chan error, 1)}
	if !h.send(r) {
		return errFull
	}
	return <-r.result
}

// Kick closes user's socket with code, if it was opened with session (any
// session when it is "").
func (h *Hub) Kick(user, session string, code int) { h.send(kick{user, session, code}) }

// DeleteMessage wipes message id and tells everyone it is gone. It returns
// ErrNotFound when there is no such message.
func (h *Hub) DeleteMessage(id int64) error {
	d := deletion{id, make(chan error, 1)}
	if !h.send(d) {
		return errors.New("shutting down")
	}
	return <-d.result
}

// Forget stops replaying messages with id <= through, which retention
// then deletes.
func (h *Hub) Forget(through int64) { h.send(forget{through}) }

// Online returns the names of the users in the room, sorted.
func (h *Hub) Online() []string {
	reply := make(onlineQuery, 1)
	if !h.send(reply) {
		return []string{}
	}
	return <-reply
}

// Shutdown closes every socket with code and waits, until ctx is done, for
// them to end.
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
