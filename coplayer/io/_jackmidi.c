/* coplayer's JACK MIDI client: one JACK client with many MIDI ports, driven
 * from Python through ctypes (see coplayer/io/jack_backend.py).
 *
 * Why not python-rtmidi's JACK API: it opens one JACK client per port, and
 * its inputs either call Python from JACK's real-time thread (waiting for
 * the GIL there stalls the whole graph) or must be polled.  Here:
 *
 *   - one client per process: fewer clients in the graph, fewer xruns;
 *   - outputs: Python writes each message into the port's lock-free ring
 *     buffer and returns; the process callback moves it into the port's
 *     MIDI buffer in the next cycle;
 *   - inputs: the process callback copies every event of every input into
 *     one ring buffer, stamped with the cycle's start (CLOCK_MONOTONIC), and
 *     posts a semaphore; a Python reader thread blocked in cp_wait() (the GIL
 *     released) wakes at once.  No polling, no Python in JACK's thread;
 *   - a stuck-note safety net (cp_net_*): after JACK skipped a cycle or
 *     reported an xrun, each output writes again the note-offs (sustain-offs,
 *     All Notes/Sound Off) it wrote in the last 0.1 s, except for keys
 *     struck again since;
 *   - idle ticks (cp_set_idle): after a spell with no input the callback
 *     also posts the reader, at the start of a cycle, so Python can do
 *     housekeeping (keep its model warm) when no message can arrive before
 *     the next cycle, never while one waits.
 *
 * libjack is opened with dlopen() at run time, so building this file needs
 * neither JACK's headers nor its library: the few declarations used are
 * below, from JACK's public API (jack/jack.h, jack/midiport.h,
 * jack/ringbuffer.h).  The process callback only touches ring buffers,
 * port buffers and the semaphore: no allocation, no locks, no system calls
 * but sem_post and clock_gettime.
 */

#include <dlfcn.h>
#include <errno.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* --- the JACK API, declared (ABI-stable since JACK 0.1xx) --------------- */

typedef uint32_t jack_nframes_t;
typedef struct _jack_client jack_client_t;
typedef struct _jack_port jack_port_t;
typedef unsigned char jack_midi_data_t;
typedef struct {
    jack_nframes_t time;
    size_t size;
    jack_midi_data_t *buffer;
} jack_midi_event_t;
typedef struct {
    char *buf;
    volatile size_t write_ptr;
    volatile size_t read_ptr;
    size_t size;
    size_t size_mask;
    int mlocked;
} jack_ringbuffer_t;

enum { JackNoStartServer = 0x01 };
enum { JackPortIsInput = 0x1, JackPortIsOutput = 0x2 };
#define MIDI_TYPE "8 bit raw midi"

static struct {
    jack_client_t *(*client_open)(const char *, int, int *, ...);
    int (*client_close)(jack_client_t *);
    int (*activate)(jack_client_t *);
    int (*deactivate)(jack_client_t *);
    int (*set_process_callback)(jack_client_t *, int (*)(jack_nframes_t, void *), void *);
    void (*on_shutdown)(jack_client_t *, void (*)(void *), void *);
    char *(*get_client_name)(jack_client_t *);
    jack_port_t *(*port_register)(jack_client_t *, const char *, const char *, unsigned long, unsigned long);
    int (*port_unregister)(jack_client_t *, jack_port_t *);
    const char *(*port_name)(const jack_port_t *);
    void *(*port_get_buffer)(jack_port_t *, jack_nframes_t);
    const char **(*get_ports)(jack_client_t *, const char *, const char *, unsigned long);
    int (*port_connected)(const jack_port_t *);
    int (*connect)(jack_client_t *, const char *, const char *);
    void (*free)(void *);
    uint32_t (*midi_get_event_count)(void *);
    int (*midi_event_get)(jack_midi_event_t *, void *, uint32_t);
    void (*midi_clear_buffer)(void *);
    int (*midi_event_write)(void *, jack_nframes_t, const jack_midi_data_t *, size_t);
    size_t (*midi_max_event_size)(void *);
    jack_ringbuffer_t *(*rb_create)(size_t);
    void (*rb_free)(jack_ringbuffer_t *);
    size_t (*rb_read)(jack_ringbuffer_t *, char *, size_t);
    size_t (*rb_peek)(jack_ringbuffer_t *, char *, size_t);
    void (*rb_read_advance)(jack_ringbuffer_t *, size_t);
    size_t (*rb_read_space)(const jack_ringbuffer_t *);
    size_t (*rb_write)(jack_ringbuffer_t *, const char *, size_t);
    size_t (*rb_write_space)(const jack_ringbuffer_t *);
    int (*rb_mlock)(jack_ringbuffer_t *);
    int (*set_xrun_callback)(jack_client_t *, int (*)(void *), void *); /* optional */
    jack_nframes_t (*last_frame_time)(const jack_client_t *);           /* optional */
    jack_nframes_t (*get_sample_rate)(jack_client_t *);                  /* optional */
    int (*set_port_connect_callback)(jack_client_t *, void (*)(uint32_t, uint32_t, int, void *), void *); /* optional */
    jack_port_t *(*port_by_id)(jack_client_t *, uint32_t);              /* optional */
} J;

static void *libjack;

/* libjack prints its errors and news to stderr ("Cannot connect to server
 * socket ..." when no server runs): the first since cp_open began is kept
 * here instead and quoted in coplayer's own error message. */
static char jack_said[256];
static void keep_jack_message(const char *msg) {
    if (!jack_said[0]) snprintf(jack_said, sizeof jack_said, "%s", msg);
}

static int load(char *err, int errlen) {
    if (libjack) return 0;
#ifdef __APPLE__
    const char *names[] = {"libjack.0.dylib", "/usr/local/lib/libjack.0.dylib", "/opt/homebrew/lib/libjack.0.dylib",
                           NULL};
    const char *install = "install JACK (e.g. brew install jack)";
#else
    const char *names[] = {"libjack.so.0", "libjack.so", NULL};
    const char *install = "install JACK (e.g. apt install libjack-jackd2-0 jackd2)";
#endif
    void *h = NULL;
    for (int i = 0; names[i] && !h; i++) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        char tried[160] = "";
        for (int i = 0; names[i]; i++)
            snprintf(tried + strlen(tried), sizeof tried - strlen(tried), "%s%s", i ? ", " : "", names[i]);
        snprintf(err, errlen, "libjack not found (looked for %s); %s", tried, install);
        return -1;
    }
#define SYM(field, name)                                                   \
    do {                                                                   \
        *(void **)(&J.field) = dlsym(h, name);                             \
        if (!J.field) {                                                    \
            snprintf(err, errlen, "libjack has no %s: too old a JACK", name); \
            dlclose(h);                                                    \
            return -1;                                                     \
        }                                                                  \
    } while (0)
    void (*set_error)(void (*)(const char *)) = (void (*)(void (*)(const char *)))dlsym(h, "jack_set_error_function");
    void (*set_info)(void (*)(const char *)) = (void (*)(void (*)(const char *)))dlsym(h, "jack_set_info_function");
    if (set_error) set_error(keep_jack_message);
    if (set_info) set_info(keep_jack_message);
    SYM(client_open, "jack_client_open");
    SYM(client_close, "jack_client_close");
    SYM(activate, "jack_activate");
    SYM(deactivate, "jack_deactivate");
    SYM(set_process_callback, "jack_set_process_callback");
    SYM(on_shutdown, "jack_on_shutdown");
    SYM(get_client_name, "jack_get_client_name");
    SYM(port_register, "jack_port_register");
    SYM(port_unregister, "jack_port_unregister");
    SYM(port_name, "jack_port_name");
    SYM(port_get_buffer, "jack_port_get_buffer");
    SYM(get_ports, "jack_get_ports");
    SYM(port_connected, "jack_port_connected");
    SYM(connect, "jack_connect");
    SYM(free, "jack_free");
    SYM(midi_get_event_count, "jack_midi_get_event_count");
    SYM(midi_event_get, "jack_midi_event_get");
    SYM(midi_clear_buffer, "jack_midi_clear_buffer");
    SYM(midi_event_write, "jack_midi_event_write");
    SYM(midi_max_event_size, "jack_midi_max_event_size");
    SYM(rb_create, "jack_ringbuffer_create");
    SYM(rb_free, "jack_ringbuffer_free");
    SYM(rb_read, "jack_ringbuffer_read");
    SYM(rb_peek, "jack_ringbuffer_peek");
    SYM(rb_read_advance, "jack_ringbuffer_read_advance");
    SYM(rb_read_space, "jack_ringbuffer_read_space");
    SYM(rb_write, "jack_ringbuffer_write");
    SYM(rb_write_space, "jack_ringbuffer_write_space");
    SYM(rb_mlock, "jack_ringbuffer_mlock");
#undef SYM
    *(void **)(&J.set_xrun_callback) = dlsym(h, "jack_set_xrun_callback");
    *(void **)(&J.last_frame_time) = dlsym(h, "jack_last_frame_time");
    *(void **)(&J.get_sample_rate) = dlsym(h, "jack_get_sample_rate");
    *(void **)(&J.set_port_connect_callback) = dlsym(h, "jack_set_port_connect_callback");
    *(void **)(&J.port_by_id) = dlsym(h, "jack_port_by_id");
    libjack = h;
    return 0;
}

/* --- the stuck-note safety net ------------------------------------------- */

/* MIDI in JACK's graph is lost when the client reading it is not run in the
 * cycle it was written (measured under `jackd --no-realtime -d dummy -p 64`:
 * every message lost was written in a cycle that the receiving client
 * skipped, whole cycles at a time, while the writer ran on time).  A lost
 * note-on is harmless; a lost note-off is a stuck note.  The writer learns of
 * such a cycle from JACK's xrun notification, 1 to 17 cycles later in that
 * measurement (2 for most), or from a gap in its own frame time.  Then it
 * writes again the note-offs (and sustain-offs) it wrote in the last
 * NET_WINDOW_S, except for keys struck again since: a repeated note-off of a
 * silent key is harmless, and a note that is still held is never ended.
 * All Notes Off and All Sound Off likewise, unless a note of their channel
 * is held.  The resend is written once more NET_ECHO_PERIODS cycles later
 * (reaching as far back): a client that was frozen may miss the first
 * cycles after it runs again too, and with them the first resend.
 *
 * Per output port: a ring of the last note-offs written, with the frame
 * time of their cycle, and for each (channel, key) the note-ons written and
 * not yet ended.  Everything is touched from the process callback only
 * (cp_net_written / cp_net_due are plain functions, also called by the
 * tests). */

#define NET_RING 512         /* note-offs remembered per output */
#define NET_WINDOW_S 0.1     /* how far back a resend reaches: the notification came up to 23 ms late */
#define NET_MIN_PERIODS 8    /* ... and at least this many cycles */
#define NET_MAX_SENDS 4      /* a note-off is written at most this often more (an xrun storm) */
#define NET_MAX_DUE 256      /* messages one resend writes at most */
#define NET_ECHO_PERIODS 16  /* the resend again this many cycles later (21 ms at 64 frames, 48 kHz) */
#define PEDAL_KEY 128        /* the "keys" of a channel's sustain-off, All Notes Off, All Sound Off in done[] */
#define NOTES_OFF_KEY 129
#define SOUND_OFF_KEY 130

typedef struct {
    uint32_t frame;    /* frame time of the cycle that last wrote it */
    uint8_t msg[3];
    uint8_t sends;     /* times written again */
} net_entry;

typedef struct {
    net_entry ring[NET_RING];
    uint32_t next;                   /* where the next entry goes */
    uint32_t used;                   /* entries in the ring, up to NET_RING */
    uint16_t held[16][128];          /* note-ons written and not yet ended */
    uint32_t held_on[16];            /* their sum per channel */
    uint8_t pedal[16];               /* sustain pedal down */
    uint32_t pass;                   /* resends so far: done[][] == pass marks a key written in this one */
    uint32_t done[16][SOUND_OFF_KEY + 1];
} cp_net;

cp_net *cp_net_create(void) { return calloc(1, sizeof(cp_net)); }
void cp_net_destroy(cp_net *n) { free(n); }

static void net_remember(cp_net *n, const unsigned char *m, uint32_t frame) {
    net_entry *e = &n->ring[n->next];
    e->frame = frame;
    memcpy(e->msg, m, 3);
    e->sends = 0;
    n->next = (n->next + 1) % NET_RING;
    if (n->used < NET_RING) n->used++;
}

/* A message the port wrote in the cycle at `frame`. */
void cp_net_written(cp_net *n, const unsigned char *m, int len, uint32_t frame) {
    if (len == 1 && m[0] == 0xFF) { /* System Reset: nothing sounds, no pedal */
        memset(n->held, 0, sizeof n->held);
        memset(n->held_on, 0, sizeof n->held_on);
        memset(n->pedal, 0, sizeof n->pedal);
        return;
    }
    if (len != 3) return;
    int kind = m[0] & 0xF0, ch = m[0] & 0x0F, key = m[1] & 0x7F;
    if (kind == 0x90 && m[2]) {
        if (n->held[ch][key] < UINT16_MAX) {
            n->held[ch][key]++;
            n->held_on[ch]++;
        }
    } else if (kind == 0x80 || kind == 0x90) {
        if (n->held[ch][key]) {
            n->held[ch][key]--;
            n->held_on[ch]--;
        }
        net_remember(n, m, frame);
    } else if (kind == 0xB0 && m[1] == 64) {
        n->pedal[ch] = m[2] >= 64;
        if (!n->pedal[ch]) net_remember(n, m, frame);
    } else if (kind == 0xB0 && m[1] == 121) { /* Reset All Controllers: pedal up */
        n->pedal[ch] = 0;
    } else if (kind == 0xB0 && (m[1] == 120 || m[1] >= 123)) { /* All Sound/Notes Off, mode changes */
        memset(n->held[ch], 0, sizeof n->held[ch]);
        n->held_on[ch] = 0;
        if (m[1] == 120 || m[1] == 123) net_remember(n, m, frame);
    }
}

/* The note-offs and sustain-offs to write again in the cycle at `frame`:
 * those written within `window` frames, oldest first, once per key, for
 * keys with no note-on held since (and channels whose pedal is up).  Up to
 * `max` 3-byte messages into out; returns how many. */
int cp_net_due(cp_net *n, uint32_t frame, uint32_t window, unsigned char *out, int max) {
    int k = 0;
    n->pass++;
    if (n->pass == 0) { /* wrapped: forget every mark */
        memset(n->done, 0, sizeof n->done);
        n->pass = 1;
    }
    for (uint32_t i = 0; i < n->used && k < max; i++) {
        net_entry *e = &n->ring[(n->next + NET_RING - n->used + i) % NET_RING];
        if (frame - e->frame > window || e->sends >= NET_MAX_SENDS) continue; /* unsigned: wraps correctly */
        int ch = e->msg[0] & 0x0F;
        int key = e->msg[1] & 0x7F, busy;
        if ((e->msg[0] & 0xF0) != 0xB0) {
            busy = n->held[ch][key] > 0;        /* the key struck again since */
        } else if (key == 64) {
            key = PEDAL_KEY;
            busy = n->pedal[ch];                /* the pedal pressed again since */
        } else {
            key = key == 123 ? NOTES_OFF_KEY : SOUND_OFF_KEY;
            busy = n->held_on[ch] > 0;          /* a note of the channel struck since */
        }
        if (busy) continue;
        e->frame = frame;  /* written again now: a later gap may take this one too */
        e->sends++;
        if (n->done[ch][key] == n->pass) continue;
        n->done[ch][key] = n->pass;
        memcpy(out + 3 * k++, e->msg, 3);
    }
    return k;
}

/* --- the client ---------------------------------------------------------- */

#define MAX_PORTS 64
#define MAX_MESSAGE 4096     /* longest message (SysEx) a port carries */
#define OUT_RING (1 << 16)   /* bytes of messages waiting per output */
#define IN_RING (1 << 18)    /* bytes of messages waiting for the reader */
#define IN_RESERVE (IN_RING / 4) /* room only note-offs and controllers may take */
/* Past it, a flood (20,000 messages/s of SysEx, junk and notes, in
 * tests_e2e/test_faults.py) that fills the ring while the reader is held up
 * would still drop note-offs: notes left sounding.  What ends a sound then
 * waits aside, counted per port, channel and key (cp_port.offs), for the
 * reader to take after the ring: never lost. */

/* A port's life: LIVE; CLOSING (its output buffer is still cleared each
 * cycle, so JACK re-sends nothing, but nothing new is written or read);
 * DEAD (the callback no longer touches it: it may be unregistered); FREE. */
enum { FREE = 0, LIVE = 1, CLOSING = 2, DEAD = 3 };

/* What an output owes the synths it is connected to (see owe() below). */
enum { OWE_SUSTAIN_OFF = 1, OWE_SOUND_OFF = 2, OWE_NOTES_OFF = 4 };
typedef struct {
    uint8_t sounding[16][128]; /* note-ons delivered to a connection and not ended */
    uint8_t notes[16][128];    /* note-offs owed */
    uint8_t controls[16];      /* OWE_* bits owed */
    int owing;
} cp_owed;

typedef struct {
    jack_port_t *port;
    jack_ringbuffer_t *ring; /* outputs: [uint16 length][bytes]... */
    cp_net *net;             /* outputs: the note-offs to write again after a gap */
    volatile uint64_t resent; /* outputs: messages the net wrote again */
    volatile int clean_on_connect; /* outputs: a new connection gets the clean start (until the client's first note-on) */
    volatile int clean_due;   /* outputs: connected since; the next cycle writes the clean start */
    int is_input;
    volatile int state;
    cp_owed owed;            /* outputs only; touched by the process callback alone */
    /* inputs only: what ends a sound and found the ring full, for the reader
     * (the callback adds, the reader takes, both atomically) */
    uint16_t offs[16][128];  /* note-offs */
    uint8_t controls[16];    /* OWE_* bits: sustain-off, All Sound Off, All Notes Off */
} cp_port;

/* The input ring holds records: header, then `length` bytes. */
typedef struct {
    int64_t t_ns;
    uint16_t length;
    uint8_t port;
} in_header;

typedef struct {
    jack_client_t *client;
    cp_port ports[MAX_PORTS];
    jack_ringbuffer_t *in_ring;
    sem_t ready;
    volatile uint64_t cycles;
    volatile uint64_t lost_in;    /* input messages dropped: the reader fell behind */
    volatile int offs_waiting;    /* an input's offs or controls hold something */
    volatile uint64_t shed;       /* input messages the reader dropped as stale (cp_set_stale) */
    volatile int64_t stale_ns;    /* note-ons and junk older than this are shed (0: never) */
    volatile int64_t period_ns;   /* the length of JACK's cycle */
    jack_nframes_t rate;          /* JACK's sample rate */
    volatile uint64_t late_out;   /* output messages left for a later cycle: MIDI buffer full */
    volatile uint64_t xruns;      /* xruns JACK reported (MIDI in the graph may be lost in one) */
    /* Cycles of JACK's frame time this client's callback never saw (a gap
     * between two callbacks): the client, or one before it in the graph,
     * was late and JACK went on without it.  MIDI sent to it in such a cycle
     * is gone unread.  A stall of the server itself (measured: jackd stopped
     * for 0.1 s) shows as about one cycle: its time does not jump. */
    volatile uint64_t skipped;
    jack_nframes_t last_frame;    /* frame time of the previous callback's cycle */
    uint64_t xruns_seen;          /* xruns when the last cycle began */
    jack_nframes_t net_window;    /* frames back a resend reaches (NET_WINDOW_S) */
    jack_nframes_t echo_frame;    /* frame time of the echo of the last resend, while echo_due */
    int echo_due;
    int have_frame;
    volatile int shutdown;
    volatile int64_t idle_ns;     /* post an idle tick after this long without input (0: never) */
    int64_t last_post_ns;         /* start of the cycle that last posted (input or tick) */
    volatile int64_t tick_ns;     /* start of the cycle of the last idle tick */
    int64_t fresh_ns;             /* how long after its cycle's start a tick is still worth taking */
    /* A note-on has left one of the outputs: from then on a new connection
     * gets no clean start (it would silence notes sounding at a synth that
     * another output of ours shares, e.g. the thru port connected mid-set). */
    volatile int played;
} cp_client;

/* A message that may be dropped under load: a note-on (late is worse than
 * never), SysEx, or bytes that are no MIDI channel message.  Note-offs,
 * controllers (sustain off, All Notes Off, coplayer's own controls), bends
 * and clock always go through. */
static int sheddable(const unsigned char *m, size_t len) {
    int status = m[0];
    if (status < 0x80 || status == 0xF0 || status == 0xFE) return 1;
    if (status >= 0xF0) return 0;
    size_t want = (status & 0xE0) == 0xC0 ? 2 : 3; /* program change and channel pressure: 2 bytes */
    if (len != want) return 1;
    return (status & 0xF0) == 0x90 && m[2] != 0;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t cp_now_ns(void) { return mono_ns(); }

/* --- what a disconnected output owes ------------------------------------- */

/* MIDI written to an output with no connection goes nowhere.  A note-off
 * lost that way (the synth was unplugged while a key sounded, then plugged
 * in again) is a note left sounding; so are a sustain-off, an All Notes Off
 * or an All Sound Off.  Each output keeps, per channel and key, the note-ons
 * it delivered and not yet ended; what would have ended them while it had no
 * connection is owed, and written first in the next cycle that has one.
 * The controllers that silence a channel are owed whenever they go nowhere
 * (a start's clean-up written before anyone connected reaches the first
 * connection); note-offs only for notes that were heard.  A synth that is
 * one of several connections and is unplugged alone is not seen. */
static void owe(cp_owed *o, const unsigned char *m, size_t len, int connected) {
    if (len == 1 && m[0] == 0xFF) { /* System Reset: as All Notes Off and sustain-off everywhere */
        for (int ch = 0; ch < 16; ch++) {
            memset(o->sounding[ch], 0, 128);
            if (!connected) o->controls[ch] |= OWE_SUSTAIN_OFF | OWE_NOTES_OFF;
        }
        o->owing |= !connected;
        return;
    }
    if (len != 3) return;
    int kind = m[0] & 0xF0, ch = m[0] & 0x0F, key = m[1] & 0x7F;
    if (kind == 0x90 && m[2]) {
        if (connected && o->sounding[ch][key] < 255) o->sounding[ch][key]++;
    } else if (kind == 0x80 || kind == 0x90) {
        if (!o->sounding[ch][key]) return;
        o->sounding[ch][key]--;
        if (!connected && o->notes[ch][key] < 255) {
            o->notes[ch][key]++;
            o->owing = 1;
        }
    } else if (kind == 0xB0 && (m[1] == 120 || m[1] == 123 || (m[1] == 64 && m[2] < 64))) {
        if (m[1] != 64) memset(o->sounding[ch], 0, 128);
        if (!connected) {
            o->controls[ch] |= m[1] == 64 ? OWE_SUSTAIN_OFF : m[1] == 120 ? OWE_SOUND_OFF : OWE_NOTES_OFF;
            o->owing = 1;
        }
    }
}

/* Write what `o` owes into `buf`, as far as it has room; the rest waits. */
static void pay(cp_owed *o, void *buf) {
    static const unsigned char cc[3][2] = {{64, 0}, {120, 0}, {123, 0}};
    for (int ch = 0; ch < 16; ch++) {
        for (int b = 0; b < 3; b++) {
            if (!(o->controls[ch] & (1 << b))) continue;
            unsigned char m[3] = {(unsigned char)(0xB0 | ch), cc[b][0], cc[b][1]};
            if (J.midi_max_event_size(buf) < 3 || J.midi_event_write(buf, 0, m, 3) != 0) return;
            o->controls[ch] &= ~(1 << b);
        }
        for (int key = 0; key < 128; key++) {
            while (o->notes[ch][key]) {
                unsigned char m[3] = {(unsigned char)(0x80 | ch), (unsigned char)key, 0};
                if (J.midi_max_event_size(buf) < 3 || J.midi_event_write(buf, 0, m, 3) != 0) return;
                o->notes[ch][key]--;
            }
        }
    }
    o->owing = 0;
}

/* Write again, first in this cycle, the note-offs the net holds due. */
static void resend_offs(cp_port *p, void *buf, jack_nframes_t frame, jack_nframes_t window) {
    unsigned char due[3 * NET_MAX_DUE];
    int n = cp_net_due(p->net, frame, window, due, NET_MAX_DUE);
    for (int k = 0; k < n; k++) {
        if (J.midi_max_event_size(buf) < 3 || J.midi_event_write(buf, 0, due + 3 * k, 3) != 0) break;
        p->resent++;
    }
}

/* A note-off, sustain-off, All Sound Off, All Notes Off or System Reset. */
static int ends_sound(const unsigned char *m, size_t len) {
    if (len == 1) return m[0] == 0xFF;
    if (len != 3) return 0;
    int kind = m[0] & 0xF0;
    return kind == 0x80 || (kind == 0x90 && m[2] == 0)
           || (kind == 0xB0 && (m[1] == 120 || m[1] == 123 || (m[1] == 64 && m[2] < 64)));
}

/* Keep a message that ends a sound for the reader when the ring is full:
 * 1, or 0 if it is not one (System Reset is not kept). */
static int keep_ending(cp_client *c, cp_port *p, const unsigned char *m, size_t len) {
    if (len != 3 || !ends_sound(m, len)) return 0;
    int ch = m[0] & 0x0F;
    if ((m[0] & 0xF0) == 0xB0)
        __sync_fetch_and_or(&p->controls[ch], m[1] == 64 ? OWE_SUSTAIN_OFF : m[1] == 120 ? OWE_SOUND_OFF : OWE_NOTES_OFF);
    else if (p->offs[ch][m[1] & 0x7F] < UINT16_MAX)
        __sync_fetch_and_add(&p->offs[ch][m[1] & 0x7F], 1);
    __sync_synchronize();
    c->offs_waiting = 1;
    return 1;
}

/* One message kept by keep_ending(), into buf: its length (3), or 0 if none. */
static int take_ending(cp_client *c, unsigned char *buf, int *port) {
    static const unsigned char cc[3] = {64, 120, 123};
    c->offs_waiting = 0;
    __sync_synchronize();
    for (int i = 0; i < MAX_PORTS; i++) {
        cp_port *p = &c->ports[i];
        if (!p->is_input || p->state != LIVE) continue;
        for (int ch = 0; ch < 16; ch++) {
            for (int b = 0; b < 3; b++) {
                if (!(__sync_fetch_and_and(&p->controls[ch], ~(1 << b)) & (1 << b))) continue;
                buf[0] = (unsigned char)(0xB0 | ch), buf[1] = cc[b], buf[2] = 0;
                *port = i;
                c->offs_waiting = 1;
                return 3;
            }
            for (int key = 0; key < 128; key++) {
                if (!p->offs[ch][key]) continue;
                __sync_fetch_and_sub(&p->offs[ch][key], 1);
                buf[0] = (unsigned char)(0x80 | ch), buf[1] = (unsigned char)key, buf[2] = 0;
                *port = i;
                c->offs_waiting = 1;
                return 3;
            }
        }
    }
    return 0;
}

/* Sustain off, All Notes Off, All Sound Off on every channel: what a new
 * connection hears first, before the port's first note (notes a killed
 * coplayer left at the synth stop). */
static void clean_start(cp_port *p, void *buf, jack_nframes_t frame) {
    static const unsigned char numbers[] = {64, 123, 120};
    for (int ch = 0; ch < 16; ch++)
        for (int k = 0; k < 3; k++) {
            unsigned char m[3] = {(unsigned char)(0xB0 | ch), numbers[k], 0};
            if (J.midi_max_event_size(buf) < 3 || J.midi_event_write(buf, 0, m, 3) != 0) return;
            cp_net_written(p->net, m, 3, frame);
        }
}

static int process(jack_nframes_t nframes, void *arg) {
    cp_client *c = arg;
    int64_t t = mono_ns();
    int got = 0;
    c->period_ns = (int64_t)nframes * 1000000000 / c->rate;
    int gap_seen = 0;
    jack_nframes_t frame = c->last_frame + nframes; /* a guess where JACK cannot tell */
    if (J.last_frame_time) {
        frame = J.last_frame_time(c->client);
        jack_nframes_t gap = frame - c->last_frame; /* unsigned: wraps correctly */
        if (c->have_frame && gap > nframes) {
            c->skipped += gap / nframes - 1;
            gap_seen = 1;
        }
    }
    c->last_frame = frame;
    c->have_frame = 1;
    uint64_t xruns = c->xruns;
    if (xruns != c->xruns_seen) {
        c->xruns_seen = xruns;
        gap_seen = 1;
    }
    int resend = gap_seen;
    jack_nframes_t window = c->net_window > NET_MIN_PERIODS * nframes ? c->net_window : NET_MIN_PERIODS * nframes;
    if (gap_seen) {
        c->echo_frame = frame + NET_ECHO_PERIODS * nframes;
        c->echo_due = 1;
    } else if (c->echo_due && (int32_t)(frame - c->echo_frame) >= 0) { /* signed: wraps correctly */
        c->echo_due = 0;
        resend = 1;
        window += NET_ECHO_PERIODS * nframes;
    }
    for (int i = 0; i < MAX_PORTS; i++) {
        cp_port *p = &c->ports[i];
        int state = p->state;
        if (state != LIVE && state != CLOSING) continue;
        __sync_synchronize();
        void *buf = J.port_get_buffer(p->port, nframes);
        if (!buf) continue;
        if (p->is_input) {
            if (state != LIVE) continue;
            uint32_t n = J.midi_get_event_count(buf);
            for (uint32_t k = 0; k < n; k++) {
                jack_midi_event_t ev;
                if (J.midi_event_get(&ev, buf, k) != 0 || ev.size == 0 || ev.size > MAX_MESSAGE) continue;
                in_header h = {t, (uint16_t)ev.size, (uint8_t)i};
                size_t space = J.rb_write_space(c->in_ring);
                if (space < sizeof h + ev.size && keep_ending(c, p, ev.buffer, ev.size)) {
                    got = 1;
                    continue;
                }
                /* the last quarter of the ring is kept for what ends notes */
                if (space < sizeof h + ev.size || (space < IN_RESERVE && sheddable(ev.buffer, ev.size))) {
                    c->lost_in++;
                    continue;
                }
                J.rb_write(c->in_ring, (const char *)&h, sizeof h);
                J.rb_write(c->in_ring, (const char *)ev.buffer, ev.size);
                got = 1;
            }
        } else {
            J.midi_clear_buffer(buf);
            if (state != LIVE) continue;
            if (p->clean_due) {
                p->clean_due = 0;
                if (p->clean_on_connect && !c->played) clean_start(p, buf, frame);
            }
            int connected = J.port_connected(p->port) > 0;
            if (connected && p->owed.owing) pay(&p->owed, buf);
            if (resend) resend_offs(p, buf, frame, window);
            size_t room = J.midi_max_event_size(buf);
            unsigned char msg[MAX_MESSAGE];
            uint16_t len;
            while (J.rb_read_space(p->ring) >= sizeof len) {
                J.rb_peek(p->ring, (char *)&len, sizeof len);
                if (J.rb_read_space(p->ring) < sizeof len + len) break; /* not all written yet */
                if (len > room) {
                    c->late_out++;
                    break;
                }
                J.rb_read_advance(p->ring, sizeof len);
                J.rb_read(p->ring, (char *)msg, len);
                if (J.midi_event_write(buf, 0, msg, len) != 0) {
                    c->late_out++; /* cannot happen after the size check; counted if it does */
                    break;
                }
                owe(&p->owed, msg, len, connected);
                cp_net_written(p->net, msg, len, frame);
                if (len == 3 && (msg[0] & 0xF0) == 0x90 && msg[2]) c->played = 1; /* a note sounds now */
                room = J.midi_max_event_size(buf);
            }
        }
    }
    __sync_fetch_and_add(&c->cycles, 1);
    int64_t idle = c->idle_ns;
    if (got || (idle > 0 && t - c->last_post_ns >= idle)) {
        if (!got) c->tick_ns = t;
        c->last_post_ns = t;
        sem_post(&c->ready);
    }
    return 0;
}

/* JACK's notification thread, not the real-time one. */
static int on_xrun(void *arg) {
    cp_client *c = arg;
    __sync_fetch_and_add(&c->xruns, 1);
    return 0;
}

/* JACK's notification thread: a connection made to one of our outputs. */
static void on_connect(uint32_t a, uint32_t b, int connect, void *arg) {
    cp_client *c = arg;
    if (!connect) return;
    jack_port_t *pa = J.port_by_id(c->client, a), *pb = J.port_by_id(c->client, b);
    for (int i = 0; i < MAX_PORTS; i++) {
        cp_port *p = &c->ports[i];
        if (!c->played && p->state == LIVE && !p->is_input && p->clean_on_connect && (p->port == pa || p->port == pb))
            p->clean_due = 1;
    }
}

static void on_shutdown(void *arg) {
    cp_client *c = arg;
    c->shutdown = 1;
    sem_post(&c->ready);
}

/* Open a client named `name` (JACK may add a suffix: cp_client_name()). */
cp_client *cp_open(const char *name, char *err, int errlen) {
    if (load(err, errlen)) return NULL;
    cp_client *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    int status = 0;
    jack_said[0] = 0;
    c->client = J.client_open(name, JackNoStartServer, &status);
    if (!c->client) {
        snprintf(err, errlen, "no JACK server is running (status 0x%x%s%s)", status,
                 jack_said[0] ? "; JACK said: " : "", jack_said);
        free(c);
        return NULL;
    }
    c->in_ring = J.rb_create(IN_RING);
    J.rb_mlock(c->in_ring);
    sem_init(&c->ready, 0, 0);
    c->rate = J.get_sample_rate ? J.get_sample_rate(c->client) : 0;
    if (!c->rate) c->rate = 48000; /* a guess where JACK cannot tell */
    c->net_window = (jack_nframes_t)(NET_WINDOW_S * c->rate);
    J.set_process_callback(c->client, process, c);
    J.on_shutdown(c->client, on_shutdown, c);
    if (J.set_xrun_callback) J.set_xrun_callback(c->client, on_xrun, c);
    if (J.set_port_connect_callback && J.port_by_id) J.set_port_connect_callback(c->client, on_connect, c);
    if (J.activate(c->client)) {
        snprintf(err, errlen, "cannot activate the JACK client %s", name);
        J.client_close(c->client);
        J.rb_free(c->in_ring);
        sem_destroy(&c->ready);
        free(c);
        return NULL;
    }
    return c;
}

const char *cp_client_name(cp_client *c) { return J.get_client_name(c->client); }

/* Register a port; returns its index, or -1 (err says why). */
int cp_add_port(cp_client *c, const char *name, int is_input, char *err, int errlen) {
    int i = 0;
    while (i < MAX_PORTS && c->ports[i].state != FREE) i++;
    if (i == MAX_PORTS) {
        snprintf(err, errlen, "a JACK client holds at most %d ports", MAX_PORTS);
        return -1;
    }
    jack_port_t *port = J.port_register(c->client, name, MIDI_TYPE, is_input ? JackPortIsInput : JackPortIsOutput, 0);
    if (!port) {
        snprintf(err, errlen, "JACK refused the port %s (a port of that name exists?)", name);
        return -1;
    }
    cp_port *p = &c->ports[i];
    p->port = port;
    p->is_input = is_input;
    p->resent = 0;
    p->clean_on_connect = 0;
    p->clean_due = 0;
    p->ring = NULL;
    memset(&p->owed, 0, sizeof p->owed);
    memset(p->offs, 0, sizeof p->offs);
    memset(p->controls, 0, sizeof p->controls);
    p->net = NULL;
    if (!is_input) {
        p->ring = J.rb_create(OUT_RING);
        J.rb_mlock(p->ring);
        p->net = cp_net_create();
        if (!p->net) {
            J.rb_free(p->ring);
            J.port_unregister(c->client, port);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    __sync_synchronize();
    p->state = LIVE;
    return i;
}

const char *cp_port_name(cp_client *c, int i) { return J.port_name(c->ports[i].port); }

/* Queue one message on an output: 0, or -1 if its ring is full. */
int cp_send(cp_client *c, int i, const unsigned char *data, int len) {
    cp_port *p = &c->ports[i];
    uint16_t n = (uint16_t)len;
    if (len <= 0 || len > MAX_MESSAGE) return -2;
    if (J.rb_write_space(p->ring) < sizeof n + n) return -1;
    J.rb_write(p->ring, (const char *)&n, sizeof n);
    J.rb_write(p->ring, (const char *)data, n);
    return 0;
}

/* Bytes an output still has to hand to JACK. */
int cp_pending(cp_client *c, int i) { return (int)J.rb_read_space(c->ports[i].ring); }

uint64_t cp_cycles(cp_client *c) { return c->cycles; }
uint64_t cp_lost_in(cp_client *c) { return c->lost_in; }
uint64_t cp_late_out(cp_client *c) { return c->late_out; }
uint64_t cp_xruns(cp_client *c) { return c->xruns; }
/* A connection made to output i before the client's first note-on gets the clean
 * start (on: 1); 0 if this JACK cannot tell of connections. */
int cp_set_clean_on_connect(cp_client *c, int i, int on) {
    if (!(J.set_port_connect_callback && J.port_by_id)) return 0;
    c->ports[i].clean_on_connect = on;
    return 1;
}

/* Messages the net wrote again on output i. */
uint64_t cp_resent(cp_client *c, int i) { return c->ports[i].resent; }

/* Cycles JACK skipped this client's callback, or -1 if this JACK cannot tell. */
int64_t cp_skipped(cp_client *c) { return J.last_frame_time ? (int64_t)c->skipped : -1; }
int cp_is_shutdown(cp_client *c) { return c->shutdown; }

/* Until two more cycles have ended (a callback that saw the old state has
 * finished), or half a second if JACK is stuck. */
static void two_cycles(cp_client *c) {
    uint64_t start = c->cycles;
    for (int k = 0; k < 2000 && !c->shutdown && c->cycles < start + 2; k++) {
        struct timespec ts = {0, 250000};
        nanosleep(&ts, NULL);
    }
}

/* Stop using port i, wait for the process callback to let go, unregister.
 * An output's queued messages are dropped: the caller waits for
 * cp_pending() == 0 first. */
void cp_remove_port(cp_client *c, int i) {
    cp_port *p = &c->ports[i];
    if (p->state != LIVE) return;
    p->state = CLOSING;
    __sync_synchronize();
    two_cycles(c);
    p->state = DEAD;
    __sync_synchronize();
    two_cycles(c);
    if (!c->shutdown) J.port_unregister(c->client, p->port);
    if (p->ring) J.rb_free(p->ring);
    cp_net_destroy(p->net);
    p->port = NULL;
    p->ring = NULL;
    p->net = NULL;
    __sync_synchronize();
    p->state = FREE;
}

/* Idle ticks after idle_s without input (0: none); a tick counts as fresh
 * for fresh_s after its cycle started. */
void cp_set_idle(cp_client *c, double idle_s, double fresh_s) {
    c->fresh_ns = (int64_t)(fresh_s * 1e9);
    c->idle_ns = (int64_t)(idle_s * 1e9);
}

/* Wait up to timeout_s for input (1), or time out (0); 2: an idle tick whose
 * cycle started less than fresh_s ago (and no input); -1 after shutdown.
 * Posts that piled up while the reader was busy are taken at once: one
 * wake per wait. */
int cp_wait(cp_client *c, double timeout_s) {
    if (J.rb_read_space(c->in_ring) > 0 || c->offs_waiting) return 1;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = ts.tv_nsec + (long long)(timeout_s * 1e9);
    ts.tv_sec += ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    int woke;
    while (!(woke = (sem_timedwait(&c->ready, &ts) == 0)) && errno == EINTR) {
    }
    while (sem_trywait(&c->ready) == 0) {
    }
    if (J.rb_read_space(c->in_ring) > 0 || c->offs_waiting) return 1;
    if (c->shutdown) return -1;
    return woke && c->idle_ns > 0 && mono_ns() - c->tick_ns < c->fresh_ns ? 2 : 0;
}

/* Bytes of input messages waiting for the reader. */
int cp_waiting(cp_client *c) { return (int)J.rb_read_space(c->in_ring) + (c->offs_waiting ? 3 : 0); }

/* Wake a reader blocked in cp_wait (e.g. to stop it). */
void cp_wake(cp_client *c) { sem_post(&c->ready); }

/* Take one input message: its length (0 if none), its port and time.
 * Messages sheddable() that waited longer than the stale time are dropped
 * here and counted (cp_shed), before Python spends any time on them. */
int cp_read(cp_client *c, unsigned char *buf, int buflen, int *port, int64_t *t_ns) {
    in_header h;
    int64_t stale = c->stale_ns, now = stale > 0 ? mono_ns() : 0;
    while (J.rb_read_space(c->in_ring) >= sizeof h) {
        J.rb_read(c->in_ring, (char *)&h, sizeof h);
        if (h.length > buflen) { /* cannot happen: buflen is MAX_MESSAGE */
            J.rb_read_advance(c->in_ring, h.length);
            continue;
        }
        J.rb_read(c->in_ring, (char *)buf, h.length);
        if (stale > 0 && now - h.t_ns > stale && sheddable(buf, h.length)) {
            c->shed++;
            continue;
        }
        *port = h.port;
        *t_ns = h.t_ns;
        return h.length;
    }
    *t_ns = mono_ns(); /* a message kept aside (keep_ending): now, after all that the ring held */
    return c->offs_waiting && buflen >= 3 ? take_ending(c, buf, port) : 0;
}

/* Shed note-ons and junk that waited longer than stale_s (0: never). */
void cp_set_stale(cp_client *c, double stale_s) { c->stale_ns = (int64_t)(stale_s * 1e9); }
uint64_t cp_shed(cp_client *c) { return c->shed; }
/* The length of JACK's cycle in ns (0 before the first cycle). */
int64_t cp_period_ns(cp_client *c) { return c->period_ns; }

/* Connect two ports by full name: 0, or JACK's error (EEXIST: already). */
int cp_connect(cp_client *c, const char *source, const char *destination) {
    return J.connect(c->client, source, destination);
}

/* MIDI ports of the graph, "\n"-separated into buf; `outputs` selects
 * ports that send (1) or receive (0).  Returns the length, -1 if buf is short. */
int cp_list_ports(cp_client *c, int outputs, char *buf, int buflen) {
    const char **names = J.get_ports(c->client, NULL, MIDI_TYPE, outputs ? JackPortIsOutput : JackPortIsInput);
    int used = 0;
    buf[0] = 0;
    if (!names) return 0;
    for (int i = 0; names[i]; i++) {
        int n = (int)strlen(names[i]);
        if (used + n + 2 > buflen) {
            J.free(names);
            return -1;
        }
        memcpy(buf + used, names[i], n);
        used += n;
        buf[used++] = '\n';
        buf[used] = 0;
    }
    J.free(names);
    return used;
}

void cp_close(cp_client *c) {
    if (!c) return;
    /* The server died (or shut us down): libjack's client is left as it is,
     * and so is c, which its threads may still hold.  jack_client_close on
     * it, once a new server of the same name runs, crashed the process (a
     * segfault in the fault suite); a dead server's client is a small leak. */
    if (c->shutdown) return;
    J.deactivate(c->client);
    for (int i = 0; i < MAX_PORTS; i++) {
        cp_port *p = &c->ports[i];
        if (p->state != FREE && p->ring) J.rb_free(p->ring);
        if (p->state != FREE) cp_net_destroy(p->net);
        p->state = FREE;
    }
    J.client_close(c->client);
    J.rb_free(c->in_ring);
    sem_destroy(&c->ready);
    free(c);
}
