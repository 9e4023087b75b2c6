package main

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Hub owns the connected clients and the newest stored messages. Only its
// goroutine (run) touches them, in answer to its channels, so every
// receiver sees messages and events in the one order the hub handled them,
// and a history replay can never miss or repeat a live message. The hub
// never waits on a socket or on the database: it only queues frames for
// clients, whose write pumps do the writing.
type Hub struct {
	register   chan registration
	unregister chan departure
	publish    chan publication
	kick       chan departure
	forget     chan int64
	deleted    chan int64
	online     chan chan []string
	quit       chan int
	done       chan struct{}

	sockets sync.WaitGroup // one per registered client, until its handler returns
	metrics *Metrics
	log     *slog.Logger

	// Owned by the hub goroutine.
	clients   map[string]*client // by lower-case user name
	recent    []Message          // newest stored messages, ascending id
	lastID    int64              // highest message id ever stored
	history   int                // messages replayed to a plain connect
	replayMax int                // messages replayed to a connect with ?since=
	maxConns  int
}

type registration struct {
	client *client
	since  int64 // replay messages after this id; -1: the last history ones
	result chan error
}

// departure removes a client (or, from kick, the client of user with that
// session) and closes its socket with code.
type departure struct {
	client        *client
	user, session string
	code          int
}

// publication is what a socket's reader sent on, in order: a stored
// message to broadcast and ack, a refusal for its sender alone, or its
// sender's leaving. All go through the hub in the order of the frames, so
// that a sender's acks keep that order and its leave follows its last
// message.
type publication struct {
	from    *client
	msg     Message
	refusal string // the error ack's code
	leave   int    // non-zero: from left; close its socket with this code
}

// accepted reports whether p is a message to store and broadcast.
func (p publication) accepted() bool { return p.refusal == "" && p.leave == 0 }

var (
	errTaken = errors.New("user already has an open WebSocket")
	errFull  = errors.New("too many connections")
)

// NewHub starts a hub that replays recent (stored messages, ascending id).
// lastID is the highest id ever handed out.
func NewHub(recent []Message, lastID int64, history, replayMax, maxConns int, metrics *Metrics, log *slog.Logger) *Hub {
	h := &Hub{
		register: make(chan registration), unregister: make(chan departure), kick: make(chan departure),
		publish: make(chan publication, 256), forget: make(chan int64), deleted: make(chan int64), online: make(chan chan []string),
		quit: make(chan int), done: make(chan struct{}), metrics: metrics, log: log, clients: make(map[string]*client),
		recent: recent, lastID: lastID, history: history, replayMax: replayMax, maxConns: maxConns,
	}
	go h.run()
	return h
}

func (h *Hub) run() {
	defer close(h.done)
	for {
		select {
		case r := <-h.register:
			r.result <- h.add(r.client, r.since)
		case d := <-h.unregister:
			h.remove(d.client, d.code)
		case p := <-h.publish:
			h.deliver(p)
		case d := <-h.kick:
			if c := h.clients[strings.ToLower(d.user)]; c != nil && (d.session == "" || c.session == d.session) {
				h.remove(c, d.code)
			}
		case id := <-h.forget:
			h.recent = slices.DeleteFunc(h.recent, func(m Message) bool { return m.ID <= id })
		case id := <-h.deleted:
			if i := sort.Search(len(h.recent), func(i int) bool { return h.recent[i].ID >= id }); i < len(h.recent) && h.recent[i].ID == id {
				h.recent[i] = Message{ID: id, Deleted: true}
			}
			h.broadcast(deleteFrame(id), nil)
		case reply := <-h.online:
			names := []string{}
			for _, c := range h.clients {
				names = append(names, c.user)
			}
			sort.Strings(names)
			reply <- names
		case code := <-h.quit:
			h.closeAll(code)
			return
		}
	}
}

// add takes c in, unless its user already has a socket or the server is
// full, and queues its replay. Others hear of the join after it, in order.
func (h *Hub) add(c *client, since int64) error {
	if old := h.clients[c.key]; old != nil {
		old.startProbe()
		return errTaken
	}
	if len(h.clients) >= h.maxConns {
		return errFull
	}
	h.clients[c.key] = c
	h.sockets.Add(1)
	msgs := h.recent[max(0, len(h.recent)-h.history):]
	if since >= 0 {
		i := sort.Search(len(h.recent), func(i int) bool { return h.recent[i].ID > since })
		msgs = h.recent[max(i, len(h.recent)-h.replayMax):]
		// Ids have no holes, so one between since and the first replayed
		// message was deleted or is beyond replayMax.
		if len(msgs) == 0 && since < h.lastID || len(msgs) > 0 && msgs[0].ID > since+1 {
			h.send(c, gapFrame)
		}
	}
	for _, m := range msgs {
		if !m.Deleted {
			h.send(c, messageFrame(m, true))
		}
	}
	h.broadcast(eventFrame("join", c.user), c)
	return nil
}

func (h *Hub) deliver(p publication) {
	switch {
	case p.leave != 0:
		h.remove(p.from, p.leave)
		return
	case p.refusal != "":
		h.send(p.from, errorAck(p.refusal))
		return
	}
	h.recent = append(h.recent, p.msg)
	if keep := max(h.history, h.replayMax); len(h.recent) > 2*keep {
		// Copying at twice the size keeps appends amortised O(1).
		h.recent = slices.Clone(h.recent[len(h.recent)-keep:])
	}
	h.lastID = p.msg.ID
	h.metrics.Add("gochat_deliveries_total", int64(len(h.clients)-1))
	h.broadcast(messageFrame(p.msg, false), p.from)
	h.send(p.from, ackFrame(p.msg.ID))
}

// send queues frame for c, if c is still here, and drops c when its queue
// is full.
func (h *Hub) send(c *client, frame []byte) {
	if h.clients[c.key] == c && !c.enqueue(frame) {
		h.dropSlow(c)
	}
}

// broadcast queues frame for every client but except. Clients whose queue
// is full are dropped after the loop, so their leave comes after frame.
func (h *Hub) broadcast(frame []byte, except *client) {
	var slow []*client
	for _, c := range h.clients {
		if c != except && !c.enqueue(frame) {
			slow = append(slow, c)
		}
	}
	for _, c := range slow {
		h.dropSlow(c)
	}
}

// dropSlow drops a client whose queue is full.
func (h *Hub) dropSlow(c *client) {
	h.log.Warn("dropping slow websocket client", "user", c.user)
	h.metrics.Add(`gochat_clients_dropped_total{reason="slow"}`, 1)
	h.remove(c, closePolicyViolation)
}

// remove takes c out, closes its socket with code and tells the others.
func (h *Hub) remove(c *client, code int) {
	if h.clients[c.key] == c {
		delete(h.clients, c.key)
		c.close(code)
		h.broadcast(eventFrame("leave", c.user), nil)
	}
}

// closeAll tells everyone that the others are leaving and closes every
// socket with code. Beyond shutdownLeaveLimit clients that is a frame for
// too many pairs, and the close frame alone says it.
func (h *Hub) closeAll(code int) {
	for _, c := range h.clients {
		if len(h.clients) <= shutdownLeaveLimit {
			h.broadcast(eventFrame("leave", c.user), c)
		}
	}
	for _, c := range h.clients {
		c.close(code)
	}
	clear(h.clients)
}

const shutdownLeaveLimit = 1000

// Register adds c, a client whose socket is about to open, and queues its
// history: since < 0 for the last -history messages, else those after since.
func (h *Hub) Register(c *client, since int64) error {
	r := registration{client: c, since: since, result: make(chan error, 1)}
	if !tell(h, h.register, r) {
		return errFull
	}
	return <-r.result
}

// Unregister removes c, if still there, and closes its socket with code.
func (h *Hub) Unregister(c *client, code int) {
	tell(h, h.unregister, departure{client: c, code: code})
}

// Kick closes user's socket with code, if it was opened with session
// (any session when it is "").
func (h *Hub) Kick(user, session string, code int) {
	tell(h, h.kick, departure{user: user, session: session, code: code})
}

// Publish hands the hub what a reader sent on: a stored message to
// broadcast and ack, a refusal to send its sender alone, or its sender's
// leaving.
func (h *Hub) Publish(p publication) { tell(h, h.publish, p) }

// DeleteMessage stops replaying message id and tells everyone it is gone.
func (h *Hub) DeleteMessage(id int64) { tell(h, h.deleted, id) }

// Forget drops replayable messages with id <= id, which retention deletes.
func (h *Hub) Forget(id int64) { tell(h, h.forget, id) }

// Online returns the names of the users with an open socket, sorted.
func (h *Hub) Online() []string {
	reply := make(chan []string, 1)
	if !tell(h, h.online, reply) {
		return []string{}
	}
	return <-reply
}

// tell sends v to the hub on ch, unless the hub has stopped.
func tell[T any](h *Hub, ch chan<- T, v T) bool {
	select {
	case ch <- v:
		return true
	case <-h.done:
		return false
	}
}

// Shutdown closes every socket with code and waits, until ctx is done, for
// their handlers to return.
func (h *Hub) Shutdown(ctx context.Context, code int) {
	tell(h, h.quit, code)
	<-h.done
	finished := make(chan struct{})
	go func() { h.sockets.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
	}
}
