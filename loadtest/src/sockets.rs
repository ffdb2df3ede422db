//! Who holds which TCP connections, read from /proc/net/tcp and tcp6: the
//! sockets of shards and relay threads live in per-thread fd tables that
//! /proc/PID/fd does not show, but every established connection is here.

/// Established connections by local and remote port.
pub struct Table {
    rows: Vec<(u16, u16)>,
}

impl Table {
    pub fn read() -> anyhow::Result<Table> {
        let mut rows = Vec::new();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address rem_address st: "0100007F:1F96", st "01" = ESTABLISHED.
                if f.len() < 4 || f[3] != "01" {
                    continue;
                }
                let port = |a: &str| {
                    a.rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                };
                if let (Some(local), Some(remote)) = (port(f[1]), port(f[2])) {
                    rows.push((local, remote));
                }
            }
        }
        Ok(Table { rows })
    }

    /// Connections accepted on `port` (the server's side).
    pub fn served_on(&self, port: u16) -> usize {
        self.rows.iter().filter(|(l, _)| *l == port).count()
    }

    /// Connections opened to `port` (the clients' side).
    pub fn opened_to(&self, port: u16) -> usize {
        self.rows.iter().filter(|(_, r)| *r == port).count()
    }
}
