//go:build !linux

package broker

import (
	"net"
	"time"
)

func setUserTimeout(net.Conn, time.Duration) {}
