// Command go-spdy-client drives vmcri's streaming server the way kubelet's
// clients (client-go's SPDY executor and port forwarder) do, with the same
// SPDY library they use, github.com/moby/spdystream. The spdy_interop test
// runs it to prove wire compatibility.
//
// Modes:
//
//	-mode exec:        remotecommand v4 (or v5) over SPDY/3.1; prints
//	                   {"protocol","stdout","stderr","error"} as one JSON object.
//	-mode portforward: portforward.k8s.io; prints one JSON object per
//	                   forwarded connection, in a JSON array.
//
// It exits 0 once the exchange completed (whatever the error stream says)
// and non-zero on a transport failure, with the reason on stderr.
//
// Build in GOPATH mode against Debian's golang-github-docker-spdystream-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o OUT ./tests/go-spdy-client
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

// As client-go's httpstream/spdy connection: how long a stream may wait
// for the server's SYN_REPLY.
const createStreamResponseTimeout = 30 * time.Second

var (
	phaseMu sync.Mutex
	phase   = "starting"
)

// setPhase records what the client waits for, for the timeout's message.
func setPhase(format string, args ...interface{}) {
	phaseMu.Lock()
	phase = fmt.Sprintf(format, args...)
	phaseMu.Unlock()
}

func currentPhase() string {
	phaseMu.Lock()
	defer phaseMu.Unlock()
	return phase
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-spdy-client: "+format+"\n", args...)
	os.Exit(1)
}

// conn wraps a spdystream connection like client-go's httpstream/spdy
// connection: every stream it creates waits for its reply, and Close resets
// them all before closing the connection.
type conn struct {
	spdy    *spdystream.Connection
	mu      sync.Mutex
	streams []*spdystream.Stream
}

func (c *conn) createStream(headers http.Header) (*spdystream.Stream, error) {
	setPhase("waiting for the reply to stream %v", headers)
	s, err := c.spdy.CreateStream(headers, nil, false)
	if err != nil {
		return nil, err
	}
	if err := s.WaitTimeout(createStreamResponseTimeout); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.streams = append(c.streams, s)
	c.mu.Unlock()
	return s, nil
}

func (c *conn) close() {
	c.mu.Lock()
	for _, s := range c.streams {
		// Reset, not Close: tears the streams down fully, as client-go does.
		s.Reset()
	}
	c.streams = nil
	c.mu.Unlock()
	c.spdy.Close()
}

// isOpen reports whether the SPDY connection still runs (its frame loop
// has not ended by GOAWAY or EOF).
func (c *conn) isOpen() bool {
	select {
	case <-c.spdy.CloseChan():
		return false
	default:
		return true
	}
}

// upgrade POSTs to rawURL asking for SPDY/3.1 with the offered
// X-Stream-Protocol-Version values, as client-go's SpdyRoundTripper does,
// and returns the SPDY connection and the protocol the server chose.
func upgrade(rawURL string, offered []string, ping bool) (*conn, string) {
	u, err := url.Parse(rawURL)
	if err != nil {
		fail("bad URL %q: %v", rawURL, err)
	}
	if u.Scheme != "http" {
		fail("only http URLs are supported, got %q", rawURL)
	}
	setPhase("upgrading %s", u.Path)
	tcp, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("dial %s: %v", u.Host, err)
	}
	req, err := http.NewRequest(http.MethodPost, rawURL, nil)
	if err != nil {
		fail("request: %v", err)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range offered {
		req.Header.Add("X-Stream-Protocol-Version", p)
	}
	if err := req.Write(tcp); err != nil {
		fail("write upgrade request: %v", err)
	}
	br := bufio.NewReader(tcp)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		fail("read upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		fail("upgrade refused: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	// The checks of SpdyRoundTripper.NewConnection.
	connection := strings.ToLower(resp.Header.Get("Connection"))
	upgradeHdr := strings.ToLower(resp.Header.Get("Upgrade"))
	if !strings.Contains(connection, "upgrade") || !strings.Contains(upgradeHdr, "spdy/3.1") {
		fail("not an SPDY/3.1 upgrade response: Connection %q, Upgrade %q", connection, upgradeHdr)
	}
	// client-go hands the raw connection to spdystream: bytes the server
	// sent right after the 101 would be lost there.
	if n := br.Buffered(); n > 0 {
		fail("server sent %d bytes after the 101 before any client frame; client-go would lose them", n)
	}
	chosen := resp.Header.Get("X-Stream-Protocol-Version")

	sc, err := spdystream.NewConnection(tcp, false)
	if err != nil {
		fail("spdy connection: %v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)
	c := &conn{spdy: sc}
	if ping {
		setPhase("waiting for the PING reply")
		// client-go pings every 5 seconds; one ping proves the server echoes.
		done := make(chan error, 1)
		go func() {
			_, err := sc.Ping()
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				fail("ping: %v", err)
			}
		case <-time.After(10 * time.Second):
			fail("ping: no reply in 10s")
		}
	}
	return c, chosen
}

type execResult struct {
	Protocol string `json:"protocol"`
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
	Error    string `json:"error"`
}

// runExec follows client-go's streamProtocolV4 (via V3 and V2): streams
// error, stdin, stdout, stderr (not with a TTY), resize (with a TTY), each
// created after the previous one was replied to.
func runExec(rawURL string, offered []string, ping, stdin bool, input string, keepStdinOpen, stdout, stderr, tty bool, width, height uint) {
	c, chosen := upgrade(rawURL, offered, ping)
	defer c.close()
	if chosen != offered[0] {
		fail("server chose protocol %q, want %q", chosen, offered[0])
	}

	headers := http.Header{}
	headers.Set("streamType", "error")
	errorStream, err := c.createStream(headers)
	if err != nil {
		fail("create error stream: %v", err)
	}
	var remoteStdin, remoteStdout, remoteStderr, resizeStream *spdystream.Stream
	if stdin {
		headers.Set("streamType", "stdin")
		if remoteStdin, err = c.createStream(headers); err != nil {
			fail("create stdin stream: %v", err)
		}
	}
	if stdout {
		headers.Set("streamType", "stdout")
		if remoteStdout, err = c.createStream(headers); err != nil {
			fail("create stdout stream: %v", err)
		}
	}
	if stderr && !tty {
		headers.Set("streamType", "stderr")
		if remoteStderr, err = c.createStream(headers); err != nil {
			fail("create stderr stream: %v", err)
		}
	}
	if tty {
		headers.Set("streamType", "resize")
		if resizeStream, err = c.createStream(headers); err != nil {
			fail("create resize stream: %v", err)
		}
	}

	// watchErrorStream.
	type readResult struct {
		data []byte
		err  error
	}
	errorChan := make(chan readResult, 1)
	go func() {
		b, err := io.ReadAll(errorStream)
		errorChan <- readResult{b, err}
	}()

	// handleResizes: a json.Encoder, so each size ends with a newline.
	if resizeStream != nil {
		size := struct {
			Width  uint16
			Height uint16
		}{uint16(width), uint16(height)}
		if err := json.NewEncoder(resizeStream).Encode(&size); err != nil {
			fail("write resize: %v", err)
		}
	}

	// copyStdin: write, then half-close (FIN); meanwhile read stdin until
	// the server ends it, as client-go does. With -keep-stdin-open the
	// local stdin never ends, like a terminal whose command exits first.
	if remoteStdin != nil {
		var once sync.Once
		go func() {
			defer once.Do(func() { remoteStdin.Close() })
			if _, err := io.Copy(remoteStdin, strings.NewReader(input)); err != nil {
				fmt.Fprintf(os.Stderr, "go-spdy-client: copy stdin: %v\n", err)
			}
			if keepStdinOpen {
				select {}
			}
		}()
		go func() {
			defer once.Do(func() { remoteStdin.Close() })
			io.Copy(io.Discard, remoteStdin)
		}()
	}

	var wg sync.WaitGroup
	var outBuf, errBuf []byte
	var outErr, errErr error
	if remoteStdout != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outBuf, outErr = io.ReadAll(remoteStdout)
		}()
	}
	if remoteStderr != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errBuf, errErr = io.ReadAll(remoteStderr)
		}()
	}
	setPhase("reading stdout and stderr to their ends")
	wg.Wait()
	if outErr != nil {
		fail("read stdout: %v", outErr)
	}
	if errErr != nil {
		fail("read stderr: %v", errErr)
	}
	setPhase("reading the error stream to its end")
	status := <-errorChan
	if status.err != nil {
		fail("read error stream: %v", status.err)
	}

	out, _ := json.Marshal(execResult{
		Protocol: chosen,
		Stdout:   string(outBuf),
		Stderr:   string(errBuf),
		Error:    string(status.data),
	})
	fmt.Println(string(out))
}

type forwardResult struct {
	Port      int    `json:"port"`
	RequestID string `json:"requestID"`
	Data      string `json:"data"`
	Error     string `json:"error"`
	// The SPDY connection was still open when the data stream ended: the
	// end came from the server's FIN, not from the connection closing.
	ConnOpenAtEOF bool `json:"conn_open_at_eof"`
}

// forward is client-go's PortForwarder.handleConnection with the local
// connection replaced by a payload: error stream (closed for writing at
// once), then data stream, both with the port and request ID.
func forward(c *conn, port int, requestID int, payload string) forwardResult {
	res := forwardResult{Port: port, RequestID: strconv.Itoa(requestID)}
	headers := http.Header{}
	headers.Set("streamType", "error")
	headers.Set("port", strconv.Itoa(port))
	headers.Set("requestID", res.RequestID)
	errorStream, err := c.createStream(headers)
	if err != nil {
		fail("request %d: create error stream: %v", requestID, err)
	}
	// We are not writing to this stream.
	errorStream.Close()
	errorChan := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(errorStream)
		if err != nil {
			fail("request %d: read error stream: %v", requestID, err)
		}
		errorChan <- b
	}()

	headers.Set("streamType", "data")
	dataStream, err := c.createStream(headers)
	if err != nil {
		fail("request %d: create data stream: %v", requestID, err)
	}
	remoteDone := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(dataStream)
		if err != nil {
			fail("request %d: read data stream: %v", requestID, err)
		}
		remoteDone <- b
	}()
	go func() {
		// Tell the server we send nothing more once the copy is done.
		defer dataStream.Close()
		if _, err := io.Copy(dataStream, strings.NewReader(payload)); err != nil {
			fail("request %d: write data stream: %v", requestID, err)
		}
	}()
	res.Data = string(<-remoteDone)
	res.ConnOpenAtEOF = c.isOpen()
	res.Error = string(<-errorChan)
	return res
}

func runPortForward(rawURL string, ping bool, ports []int, requests int, payload string, repeat int) {
	c, chosen := upgrade(rawURL, []string{"portforward.k8s.io"}, ping)
	defer c.close()
	if chosen != "portforward.k8s.io" {
		fail("unable to negotiate protocol: server chose %q", chosen)
	}
	results := make([]forwardResult, requests)
	var wg sync.WaitGroup
	for i := 0; i < requests; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = forward(c, ports[i%len(ports)], i, strings.Repeat(fmt.Sprintf("%s-%d", payload, i), repeat))
		}(i)
	}
	setPhase("waiting for the forwarded connections' data and error streams to end")
	wg.Wait()
	out, _ := json.Marshal(results)
	fmt.Println(string(out))
}

func main() {
	mode := flag.String("mode", "exec", "exec or portforward")
	rawURL := flag.String("url", "", "the streaming URL")
	protocol := flag.String("protocol", "v4.channel.k8s.io", "exec: the remotecommand protocol to offer first (and expect)")
	// With -protocol v5.channel.k8s.io the offer is client-go's since v1.30
	// (v5, v4, v3, v2, channel.k8s.io); with v4, that of earlier releases.
	alsoOffer := flag.String("also-offer", "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io", "exec: protocols offered after -protocol, comma-separated (-protocol itself is skipped)")
	ping := flag.Bool("ping", true, "send one SPDY PING after connecting and wait for its reply")
	stdin := flag.Bool("stdin", false, "exec: open a stdin stream")
	input := flag.String("input", "", "exec: what to write on stdin before closing it")
	keepStdinOpen := flag.Bool("keep-stdin-open", false, "exec: write -input but never close stdin")
	stdout := flag.Bool("stdout", true, "exec: open a stdout stream")
	stderr := flag.Bool("stderr", true, "exec: open a stderr stream (not with -tty)")
	tty := flag.Bool("tty", false, "exec: terminal mode (no stderr stream; a resize stream)")
	width := flag.Uint("width", 80, "exec: terminal width sent on the resize stream")
	height := flag.Uint("height", 24, "exec: terminal height sent on the resize stream")
	portList := flag.String("ports", "80", "portforward: comma-separated ports; request i uses port i mod len")
	requests := flag.Int("requests", 1, "portforward: concurrent forwarded connections")
	payload := flag.String("payload", "hello", "portforward: bytes sent on each data stream (suffixed -<i>)")
	repeat := flag.Int("repeat", 1, "portforward: send the suffixed payload this many times")
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	flag.Parse()

	if *rawURL == "" {
		fail("-url is required")
	}
	time.AfterFunc(*timeout, func() { fail("timed out after %s %s", *timeout, currentPhase()) })

	switch *mode {
	case "exec":
		offered := []string{*protocol}
		for _, p := range strings.Split(*alsoOffer, ",") {
			if p = strings.TrimSpace(p); p != "" && p != *protocol {
				offered = append(offered, p)
			}
		}
		runExec(*rawURL, offered, *ping, *stdin, *input, *keepStdinOpen, *stdout, *stderr, *tty, *width, *height)
	case "portforward":
		var ports []int
		for _, p := range strings.Split(*portList, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(p))
			if err != nil {
				fail("bad port %q", p)
			}
			ports = append(ports, n)
		}
		if *requests < 1 || *repeat < 1 {
			fail("-requests and -repeat must be at least 1")
		}
		runPortForward(*rawURL, *ping, ports, *requests, *payload, *repeat)
	default:
		fail("unknown -mode %q", *mode)
	}
}
