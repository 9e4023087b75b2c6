// Command loadtest drives a running gochat server and reports what users
// feel and what the server pays: delivery latency, losses, and the server's
// CPU per delivery as a multiple of the machine's floor, the cost of one
// small write() to a loopback socket, measured in the same run.
//
// Start the server with its rate limits off, then point this at it:
//
//	go run . -addr 127.0.0.1:7777 -db /tmp/load.db -msg-rate 0 -auth-rate 0 -open-rate 0 &
//	go run ./loadtest -addr 127.0.0.1:7777 -pid $!
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

type options struct {
	addr      string
	pid       int
	modes     string
	receivers int
	senders   int
	rate      float64
	jitter    float64
	window    int
	duration  time.Duration
	idle      int
	setup     int
	conc      int
	sizes     string
	server    string
	serverCPU string
	flags     string
}

func main() {
	var o options
	flag.StringVar(&o.addr, "addr", "127.0.0.1:7777", "server address")
	flag.IntVar(&o.pid, "pid", 0, "server process id, for its CPU time and RSS (0: not reported)")
	flag.StringVar(&o.modes, "mode", "floor,fanout,idle,setup", "comma-separated: floor, fanout, idle, setup, room")
	flag.IntVar(&o.receivers, "receivers", 200, "fan-out: receiving clients")
	flag.IntVar(&o.senders, "senders", 4, "fan-out: sending clients")
	flag.Float64Var(&o.rate, "rate", 50, "fan-out: messages per second per sender (0: as fast as acks allow)")
	flag.Float64Var(&o.jitter, "jitter", 0.5, "fan-out with -rate: each sender starts at a random phase and waits a random 1±jitter intervals between messages (0: all in step)")
	flag.IntVar(&o.window, "window", 1, "fan-out with -rate 0: unacknowledged messages per sender")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "fan-out: send window")
	flag.IntVar(&o.idle, "idle", 10000, "idle: connected clients that only listen")
	flag.IntVar(&o.setup, "setup", 2000, "setup: accounts registered, logged in and connected")
	flag.IntVar(&o.conc, "concurrency", 64, "setup and idle: parallel account set-ups")
	flag.StringVar(&o.sizes, "sizes", "800,1000,1200,1500", "room: room sizes, each on a fresh server; every tenth user sends 1/s")
	flag.StringVar(&o.server, "server", "", "room: the gochat binary to start for each size")
	flag.StringVar(&o.serverCPU, "server-cpu", "0", "room: CPUs the server is pinned to (taskset -c; empty: not pinned)")
	flag.StringVar(&o.flags, "server-flags", "-msg-rate 0 -auth-rate 0 -open-rate 0 -read-rate 0 -max-conns-per-ip 100000",
		"room: the server's flags besides -addr and -db (an older build may lack some)")
	flag.Parse()
	raiseFileLimit()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	floor := measureFloor()
	fmt.Printf("%-34s %10.2f µs per write (1 = floor)\n", "floor: 100-byte loopback write", floor.Seconds()*1e6)
	prefix := fmt.Sprintf("l%x", time.Now().UnixNano()&0xFFFFFF)
	failed := false
	for _, mode := range strings.Split(o.modes, ",") {
		var err error
		switch strings.TrimSpace(mode) {
		case "floor":
		case "fanout":
			var r result
			r, err = fanout(o, prefix+"f", floor)
			failed = failed || r.lost > 0
		case "room":
			err = room(o, prefix+"r", floor)
		case "idle":
			err = idle(o, prefix+"i")
		case "setup":
			err = setup(o, prefix+"s")
		default:
			err = fmt.Errorf("unknown mode %q", mode)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	if failed {
		return errors.New("messages were lost")
	}
	return nil
}

// --- floor ---

// measureFloor returns the CPU time one thread spends on a 100-byte write()
// to a loopback TCP socket that another goroutine drains.
func measureFloor() time.Duration {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			panic(err)
		}
		accepted <- c
	}()
	w, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer w.Close()
	r := <-accepted
	defer r.Close()
	go io.Copy(io.Discard, r)

	const n = 50000
	msg := bytes.Repeat([]byte("x"), 100)
	raw, _ := w.(*net.TCPConn).SyscallConn()
	best := time.Duration(1 << 62)
	for range 3 { // the quietest of three rounds: others only add noise
		var cpu time.Duration
		runtime.LockOSThread()
		raw.Write(func(fd uintptr) bool {
			start := threadCPU()
			for range n {
				for {
					_, err := syscall.Write(int(fd), msg)
					if err != syscall.EAGAIN && err != syscall.EINTR {
						break
					}
				}
			}
			cpu = threadCPU() - start
			return true
		})
		runtime.UnlockOSThread()
		best = min(best, cpu/n)
	}
	return best
}

func threadCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// --- the server's side, from /proc ---

type procSample struct {
	cpu time.Duration
	rss int64 // bytes
}

func sampleProc(pid int) procSample {
	if pid == 0 {
		return procSample{}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procSample{}
	}
	// Fields after the command name, which is in parentheses.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	rssPages, _ := strconv.ParseInt(fields[21], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	return procSample{
		cpu: time.Duration(utime+stime) * time.Second / ticks,
		rss: rssPages * int64(os.Getpagesize()),
	}
}

// --- accounts ---

var httpClient = &http.Client{
	Timeout:   30 * time.Second,
	Transport: &http.Transport{MaxIdleConnsPerHost: 256},
}

func postJSON(url string, body any) (*http.Response, map[string]string, error) {
	b, _ := json.Marshal(body)
	resp, err := httpClient.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	var out map[string]string
	json.NewDecoder(resp.Body).Decode(&out)
	return resp, out, nil
}

// account registers name and logs in, returning the session.
func account(addr, name string) (string, error) {
	base := "http://" + addr
	resp, out, err := postJSON(base+"/api/register", map[string]string{"username": name})
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("register %s: %d %v", name, resp.StatusCode, out)
	}
	resp, out, err = postJSON(base+"/api/login", map[string]string{"key": out["key"]})
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("login %s: %d %v", name, resp.StatusCode, out)
	}
	for _, c := range resp.Cookies() {
		if c.Name == "session" {
			return c.Value, nil
		}
	}
	return "", fmt.Errorf("login %s: no session cookie", name)
}

// dial opens a WebSocket with the library, for senders and idle clients.
func dial(addr, session string) (*websocket.Conn, error) {
	cfg, err := websocket.NewConfig("ws://"+addr+"/ws", "http://"+addr)
	if err != nil {
		return nil, err
	}
	cfg.Header.Set("Cookie", "session="+session)
	return websocket.DialConfig(cfg)
}

// dialRaw opens a WebSocket by hand, for receivers that read frames
// straight off the socket through a large buffer: on a small machine the
// load tool must not be what a run measures.
func dialRaw(addr, session string) (net.Conn, *bufio.Reader, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: session=%s\r\n\r\n", addr, session)
	br := bufio.NewReaderSize(c, 64<<10)
	resp, err := http.ReadResponse(br, nil)
	if err == nil && resp.StatusCode != http.StatusSwitchingProtocols {
		err = fmt.Errorf("websocket: %s", resp.Status)
	}
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, br, nil
}

// accounts sets up n accounts, conc at a time, calling got for each.
func accounts(o options, prefix string, n int, got func(i int, session string) error) error {
	var next atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for range min(o.conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				session, err := account(o.addr, fmt.Sprintf("%s%d", prefix, i))
				if err == nil {
					err = got(i, session)
				}
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// --- fan-out ---

type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d []time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d...)
	l.mu.Unlock()
}

// result is what one fan-out run measured.
type result struct {
	p50, p99    time.Duration
	lost        int64
	perDelivery time.Duration // server CPU; 0 without -pid
	toolBusy    float64       // the load tool's CPU over the send window, per core it may use
}

// fanout runs receivers and senders and prints what happened.
func fanout(o options, prefix string, floor time.Duration) (result, error) {
	n := o.receivers + o.senders
	receivers := make([]net.Conn, o.receivers)
	readers := make([]*bufio.Reader, o.receivers)
	senders := make([]*websocket.Conn, o.senders)
	defer func() {
		for _, c := range receivers {
			if c != nil {
				c.Close()
			}
		}
		for _, c := range senders {
			if c != nil {
				c.Close()
			}
		}
	}()
	err := accounts(o, prefix, n, func(i int, session string) (err error) {
		if i < o.receivers {
			receivers[i], readers[i], err = dialRaw(o.addr, session)
		} else {
			senders[i-o.receivers], err = dial(o.addr, session)
		}
		return err
	})
	if err != nil {
		return result{}, err
	}

	var delivered atomic.Int64
	var lats latencies
	var rwg sync.WaitGroup
	for i, c := range receivers {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			receive(c, readers[i], prefix, &delivered, &lats)
		}()
	}
	time.Sleep(500 * time.Millisecond) // let join events and history settle

	before, toolBefore := sampleProc(o.pid), processCPU()
	start := time.Now()
	var sent atomic.Int64
	var swg sync.WaitGroup
	for i, ws := range senders {
		swg.Add(1)
		go func() {
			defer swg.Done()
			sent.Add(send(ws, fmt.Sprintf("%s-%d", prefix, i), o, start.Add(o.duration)))
		}()
	}
	swg.Wait()
	window := time.Since(start)
	after, toolAfter := sampleProc(o.pid), processCPU()

	want := sent.Load() * int64(o.receivers)
	drainUntil := time.Now().Add(5 * time.Second)
	for delivered.Load() < want && time.Now().Before(drainUntil) {
		time.Sleep(20 * time.Millisecond)
	}
	for _, c := range receivers {
		c.Close()
	}
	rwg.Wait()

	got := delivered.Load()
	slices.Sort(lats.d)
	pct := func(p float64) time.Duration {
		if len(lats.d) == 0 {
			return 0
		}
		return lats.d[min(len(lats.d)-1, int(p*float64(len(lats.d))))]
	}
	r := result{p50: pct(0.5), p99: pct(0.99), lost: want - got,
		toolBusy: float64(toolAfter-toolBefore) / float64(window) / float64(runtime.NumCPU())}
	rate := "max"
	if o.rate > 0 {
		rate = fmt.Sprintf("%g/s", o.rate)
	}
	fmt.Printf("fan-out: %d receivers, %d senders at %s each, %v\n", o.receivers, o.senders, rate, o.duration)
	fmt.Printf("  %-32s %10d\n", "messages sent (acked)", sent.Load())
	fmt.Printf("  %-32s %10d of %d\n", "deliveries", got, want)
	fmt.Printf("  %-32s %10d\n", "lost", r.lost)
	fmt.Printf("  %-32s %10.0f\n", "deliveries/s", float64(got)/window.Seconds())
	fmt.Printf("  %-32s %10v %v %v %v\n", "latency p50 p90 p99 max", pct(0.5).Round(10*time.Microsecond),
		pct(0.9).Round(10*time.Microsecond), pct(0.99).Round(10*time.Microsecond), pct(1).Round(10*time.Microsecond))
	if o.pid != 0 && got > 0 {
		r.perDelivery = (after.cpu - before.cpu) / time.Duration(got)
		fmt.Printf("  %-32s %10.2f µs = %.2f × floor\n", "server CPU per delivery", r.perDelivery.Seconds()*1e6,
			float64(r.perDelivery)/float64(floor))
		fmt.Printf("  %-32s %10.1f MiB\n", "server RSS", float64(after.rss)/(1<<20))
	}
	fmt.Printf("  %-32s %9.0f %% of its %d core(s)\n", "load tool CPU", 100*r.toolBusy, runtime.NumCPU())
	if r.toolBusy > 0.7 {
		fmt.Println("  the load tool was more than 70 % busy: these latencies are partly its own")
	}
	return r, nil
}

// processCPU is the CPU time this process has used, all threads.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// message is what the load tool sends: its send time rides in the text.
func messageText(tag string, seq int64) string {
	return fmt.Sprintf("%s %d %d", tag, seq, time.Now().UnixNano())
}

func sentAt(text string) (time.Time, bool) {
	i := strings.LastIndexByte(text, ' ')
	if i < 0 {
		return time.Time{}, false
	}
	ns, err := strconv.ParseInt(text[i+1:], 10, 64)
	return time.Unix(0, ns), err == nil
}

// send sends until deadline, paced by o.rate or by acks, and returns how
// many messages were acked.
func send(ws *websocket.Conn, tag string, o options, deadline time.Time) int64 {
	acks := make(chan struct{}, 1<<16)
	go func() {
		for {
			var frame struct {
				Status *bool `json:"status"`
			}
			if err := websocket.JSON.Receive(ws, &frame); err != nil {
				close(acks)
				return
			}
			if frame.Status != nil && *frame.Status {
				acks <- struct{}{}
			}
		}
	}()
	var sent, acked int64
	interval := time.Duration(float64(time.Second) / o.rate)
	next := time.Now()
	if o.rate > 0 && o.jitter > 0 {
		// Real users do not send in step: start at a random phase.
		next = next.Add(time.Duration(rand.Int64N(int64(interval))))
	}
	for time.Now().Before(deadline) {
		if o.rate > 0 {
			time.Sleep(time.Until(next))
			next = next.Add(time.Duration(float64(interval) * (1 + o.jitter*(2*rand.Float64()-1))))
		} else if sent-acked >= int64(o.window) {
			if _, ok := <-acks; !ok {
				return acked
			}
			acked++
			continue
		}
		if err := websocket.JSON.Send(ws, map[string]string{"message": messageText(tag, sent)}); err != nil {
			return acked
		}
		sent++
	}
	// Wait for the acks of what is in flight.
	timeout := time.After(5 * time.Second)
	for acked < sent {
		select {
		case _, ok := <-acks:
			if !ok {
				return acked
			}
			acked++
		case <-timeout:
			return acked
		}
	}
	return acked
}

// receive counts live messages from this run and their latency. It reads
// raw frames and looks only at the text's start and its send time: no
// JSON decoding, no allocation per frame.
func receive(c net.Conn, br *bufio.Reader, prefix string, delivered *atomic.Int64, lats *latencies) {
	var local []time.Duration
	defer func() { lats.add(local) }()
	head := []byte(`{"message":"` + prefix)
	var payload []byte
	for {
		var hdr [2]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return
		}
		size := int(hdr[1] & 0x7F)
		var ext [8]byte
		switch size {
		case 126:
			if _, err := io.ReadFull(br, ext[:2]); err != nil {
				return
			}
			size = int(binary.BigEndian.Uint16(ext[:2]))
		case 127:
			if _, err := io.ReadFull(br, ext[:]); err != nil {
				return
			}
			size = int(binary.BigEndian.Uint64(ext[:]))
		}
		payload = slices.Grow(payload[:0], size)[:size]
		if _, err := io.ReadFull(br, payload); err != nil {
			return
		}
		if hdr[0]&0x0F == 0x9 { // a ping: a masked pong (key 0) with its payload
			c.Write(append([]byte{0x8A, 0x80 | byte(len(payload)), 0, 0, 0, 0}, payload...))
			continue
		}
		end := bytes.Index(payload, []byte(`","author"`))
		if !bytes.HasPrefix(payload, head) || end < 0 || bytes.Contains(payload, []byte(`"history":true`)) {
			continue
		}
		if at, ok := sentAt(string(payload[len(`{"message":"`):end])); ok {
			local = append(local, time.Since(at))
		}
		delivered.Add(1)
	}
}

// --- room ---

// room runs fan-out at each of o.sizes users, every tenth sending one
// message a second at a random phase, each on a fresh server and database
// started from o.server with o.flags (pinned to o.serverCPU), and prints the knee: the
// largest size with p99 under 100 ms and nothing lost.
func room(o options, prefix string, floor time.Duration) error {
	if o.server == "" {
		return errors.New("-mode room needs -server, the gochat binary to start")
	}
	type row struct {
		users int
		r     result
	}
	var rows []row
	for _, field := range strings.Split(o.sizes, ",") {
		users, err := strconv.Atoi(strings.TrimSpace(field))
		if err != nil || users < 10 {
			return fmt.Errorf("bad size %q", field)
		}
		stop, addr, pid, err := startServer(o)
		if err != nil {
			return err
		}
		ro := o
		ro.addr, ro.pid, ro.senders, ro.rate = addr, pid, users/10, 1
		ro.receivers = users - ro.senders
		r, err := fanout(ro, fmt.Sprint(prefix, users), floor)
		stop()
		if err != nil {
			return err
		}
		rows = append(rows, row{users, r})
	}
	fmt.Printf("room: every tenth user sends 1/s, %v, server on CPU %q\n", o.duration, o.serverCPU)
	fmt.Printf("  %8s %10s %10s %6s %16s %10s\n", "users", "p50", "p99", "lost", "CPU/delivery", "tool CPU")
	knee := 0
	for _, w := range rows {
		fmt.Printf("  %8d %10v %10v %6d %13.2f µs %9.0f %%\n", w.users, w.r.p50.Round(100*time.Microsecond),
			w.r.p99.Round(100*time.Microsecond), w.r.lost, w.r.perDelivery.Seconds()*1e6, 100*w.r.toolBusy)
		if w.r.p99 < 100*time.Millisecond && w.r.lost == 0 {
			knee = max(knee, w.users)
		}
	}
	fmt.Printf("  knee (largest size with p99 < 100 ms, nothing lost): %d users\n", knee)
	return nil
}

// startServer starts o.server on a free loopback port with a fresh
// database and its limits off, and waits until it answers.
func startServer(o options) (stop func(), addr string, pid int, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", 0, err
	}
	addr = ln.Addr().String()
	ln.Close()
	dir, err := os.MkdirTemp("", "gochat-room")
	if err != nil {
		return nil, "", 0, err
	}
	args := append([]string{o.server, "-addr", addr, "-db", filepath.Join(dir, "room.db")}, strings.Fields(o.flags)...)
	if o.serverCPU != "" {
		args = append([]string{"taskset", "-c", o.serverCPU}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	if err := cmd.Start(); err != nil {
		return nil, "", 0, err
	}
	stop = func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		os.RemoveAll(dir)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if resp, err := http.Get("http://" + addr + "/healthz"); err == nil {
			resp.Body.Close()
			return stop, addr, cmd.Process.Pid, nil
		}
		if time.Now().After(deadline) {
			stop()
			return nil, "", 0, errors.New("the server did not start")
		}
	}
}

// --- idle ---

func idle(o options, prefix string) error {
	runtime.GC()
	before := sampleProc(o.pid)
	conns := make([]*websocket.Conn, o.idle)
	var rwg sync.WaitGroup
	closeAll := func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		rwg.Wait()
	}
	err := accounts(o, prefix, o.idle, func(i int, session string) error {
		ws, err := dial(o.addr, session)
		if err != nil {
			return err
		}
		conns[i] = ws
		rwg.Add(1)
		go func() { // answer pings, discard the rest
			defer rwg.Done()
			var b []byte
			for websocket.Message.Receive(ws, &b) == nil {
			}
		}()
		return nil
	})
	if err != nil {
		closeAll()
		return err
	}
	time.Sleep(3 * time.Second) // let the server settle after the burst
	held := sampleProc(o.pid)
	closeAll()
	time.Sleep(10 * time.Second)
	after := sampleProc(o.pid)
	time.Sleep(50 * time.Second)
	later := sampleProc(o.pid)
	fmt.Printf("idle: %d connected clients that only listen\n", o.idle)
	if o.pid != 0 {
		per := float64(held.rss-before.rss) / float64(o.idle)
		fmt.Printf("  %-32s %10.1f MiB -> %.1f MiB\n", "server RSS", float64(before.rss)/(1<<20), float64(held.rss)/(1<<20))
		fmt.Printf("  %-32s %10.1f KiB\n", "server RSS per connection", per/1024)
		fmt.Printf("  %-32s %10.1f MiB, after 60 s %.1f MiB\n", "server RSS 10 s after they left",
			float64(after.rss)/(1<<20), float64(later.rss)/(1<<20))
	}
	return nil
}

// --- setup ---

func setup(o options, prefix string) error {
	conns := make([]*websocket.Conn, o.setup)
	start := time.Now()
	err := accounts(o, prefix, o.setup, func(i int, session string) (err error) {
		conns[i], err = dial(o.addr, session)
		return err
	})
	elapsed := time.Since(start)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	if err != nil {
		return err
	}
	fmt.Printf("setup: %d accounts registered, logged in and connected, %d at a time\n", o.setup, o.conc)
	fmt.Printf("  %-32s %10.0f\n", "accounts per second", float64(o.setup)/elapsed.Seconds())
	return nil
}

func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}
