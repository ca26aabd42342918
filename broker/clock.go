package broker

import (
	"log/slog"
	"sync"
	"time"
)

// clock is the broker's time: the wall clock, except that it never runs
// backwards within a process. When the wall clock is stepped back (by an
// admin, NTP or someone with that power), time goes on from the last
// reading at the rate of the monotonic clock instead, so a step cannot
// stretch a nonce, a session or a policy's maximum age. Records written
// before a restart are bounded the other way: one created "in the future"
// is refused (see liveSession).
type clock struct {
	wall func() time.Time
	log  *slog.Logger

	mu       sync.Mutex
	last     time.Time // last time returned
	lastMono time.Time // monotonic reading when it was returned
	warned   bool
}

func newClock(wall func() time.Time, log *slog.Logger) *clock {
	return &clock{wall: wall, log: log}
}

func (c *clock) now() time.Time {
	w := c.wall().Round(0)
	mono := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.lastMono.IsZero() {
		if floor := c.last.Add(mono.Sub(c.lastMono)); w.Before(floor) {
			if !c.warned && floor.Sub(w) > time.Second {
				c.log.Warn("the wall clock stepped back; broker time goes on from its last reading", "by", floor.Sub(w).Round(time.Millisecond).String())
				c.warned = true
			}
			w = floor
		} else {
			c.warned = false
		}
	}
	c.last, c.lastMono = w, mono
	return w
}
