//! A minimal HTTP/1.1 keep-alive client: one connection, one request at a time, as a load worker
//! needs and nothing more. The load tool shares the machine's two cores with the server it
//! measures; a general-purpose client (pool, redirect handling, header maps, per-request boxed
//! futures) spent about as much CPU per request as Tally itself, and every cycle it takes is one
//! the server does not get. Like `wrk`, this client writes the request bytes into a reused
//! buffer and reads the answer with `httparse`.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest response head this client accepts; Tally's are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

/// The parts of an answer a load worker looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: usize,
    /// The server said it closes the connection after this answer.
    pub closes: bool,
    /// Bytes of the head, up to and including the blank line.
    pub head_len: usize,
}

/// Parses a response head. `Ok(None)`: more bytes are needed.
pub fn parse_response_head(buffer: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buffer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD_BYTES => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head too long".into()),
        Err(error) => return Err(format!("malformed response: {error}")),
    };
    let status = response.code.ok_or("response without a status")?;
    let mut content_length = None;
    let mut closes = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| "bad content-length")?;
            content_length = Some(value.trim().parse().map_err(|_| "bad content-length")?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Tally answers with a known length; anything else is not what this client measures.
            return Err("chunked responses are not supported".into());
        } else if header.name.eq_ignore_ascii_case("connection") {
            closes = header.value.eq_ignore_ascii_case(b"close");
        }
    }
    Ok(Some(ResponseHead {
        status,
        content_length: content_length.unwrap_or(0),
        closes,
        head_len,
    }))
}

/// One keep-alive connection to one server. A failed request drops the connection; the next
/// request opens a new one.
pub struct Http1Connection {
    address: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    received: Vec<u8>,
    body: Vec<u8>,
}

impl Http1Connection {
    /// `base_url` is `http://IP:PORT` (the load tool only talks to loopback addresses).
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let host = base_url
            .strip_prefix("http://")
            .with_context(|| format!("{base_url} is not an http:// URL"))?
            .trim_end_matches('/');
        let address: SocketAddr = host
            .parse()
            .with_context(|| format!("{base_url} is not http://IP:PORT"))?;
        Ok(Self {
            address,
            host: host.to_string(),
            stream: None,
            request: Vec::with_capacity(1024),
            received: Vec::with_capacity(4096),
            body: Vec::new(),
        })
    }

    /// Sends a request whose body the caller wrote with `write_body` (JSON when non-empty) and
    /// returns the status and the body of the answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        write_body: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(u16, &[u8]), String> {
        let outcome = self.exchange(method, path, write_body).await;
        if outcome.is_err() {
            self.stream = None;
        }
        outcome.map(|status| (status, self.body.as_slice()))
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        write_body: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u16, String> {
        self.body.clear();
        write_body(&mut self.body);
        self.request.clear();
        self.request.extend_from_slice(method.as_bytes());
        self.request.push(b' ');
        self.request.extend_from_slice(path.as_bytes());
        self.request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        self.request.extend_from_slice(self.host.as_bytes());
        if !self.body.is_empty() {
            self.request
                .extend_from_slice(b"\r\ncontent-type: application/json");
        }
        self.request.extend_from_slice(b"\r\ncontent-length: ");
        self.request
            .extend_from_slice(self.body.len().to_string().as_bytes());
        self.request.extend_from_slice(b"\r\n\r\n");
        self.request.extend_from_slice(&self.body);

        if self.stream.is_none() {
            let stream = TcpStream::connect(self.address)
                .await
                .map_err(|_| "connect error".to_string())?;
            stream
                .set_nodelay(true)
                .map_err(|_| "connect error".to_string())?;
            self.stream = Some(stream);
            self.received.clear();
        }
        let stream = self.stream.as_mut().expect("connected just above");
        stream
            .write_all(&self.request)
            .await
            .map_err(|_| "request error".to_string())?;

        let head = loop {
            if let Some(head) = parse_response_head(&self.received)? {
                break head;
            }
            read_more(stream, &mut self.received).await?;
        };
        let end = head.head_len + head.content_length;
        while self.received.len() < end {
            read_more(stream, &mut self.received).await?;
        }
        self.body.clear();
        self.body
            .extend_from_slice(&self.received[head.head_len..end]);
        self.received.drain(..end);
        if head.closes {
            self.stream = None;
        }
        Ok(head.status)
    }
}

async fn read_more(stream: &mut TcpStream, received: &mut Vec<u8>) -> Result<(), String> {
    received.reserve(4096);
    match stream.read_buf(received).await {
        Ok(0) => Err("connection closed".to_string()),
        Ok(_) => Ok(()),
        Err(_) => Err("request error".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn parses_a_complete_head_and_asks_for_more_of_a_partial_one() {
        let answer = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        let head = parse_response_head(answer).unwrap().unwrap();
        assert_eq!(
            head,
            ResponseHead {
                status: 202,
                content_length: 7,
                closes: false,
                head_len: answer.len() - 7,
            }
        );
        assert_eq!(parse_response_head(&answer[..20]).unwrap(), None);
        let closing =
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(parse_response_head(closing).unwrap().unwrap().closes);
    }

    #[test]
    fn rejects_what_it_cannot_measure() {
        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err()
        );
        assert!(parse_response_head(b"garbage\r\n\r\n").is_err());
        assert!(Http1Connection::new("https://127.0.0.1:1").is_err());
    }

    /// Two requests over one connection, the second answer arriving in pieces, then a server
    /// that closes the connection: the client reconnects for the next request.
    #[tokio::test]
    async fn keeps_the_connection_alive_and_reconnects_after_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut requests_seen = Vec::new();
            for connection_index in 0..2 {
                let (mut socket, _) = listener.accept().await.unwrap();
                let answers = if connection_index == 0 { 2 } else { 1 };
                let mut buffer = Vec::new();
                for answer in 0..answers {
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        socket.read_buf(&mut buffer).await.unwrap();
                    }
                    let text = String::from_utf8(buffer.clone()).unwrap();
                    let head_end = text.find("\r\n\r\n").unwrap() + 4;
                    let length: usize = text
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    while buffer.len() < head_end + length {
                        socket.read_buf(&mut buffer).await.unwrap();
                    }
                    requests_seen
                        .push(String::from_utf8(buffer[..head_end + length].to_vec()).unwrap());
                    buffer.drain(..head_end + length);
                    if answer == 0 && connection_index == 0 {
                        socket
                            .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    } else if connection_index == 0 {
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-len")
                            .await
                            .unwrap();
                        tokio::task::yield_now().await;
                        socket
                            .write_all(b"gth: 5\r\nconnection: close\r\n\r\nhello")
                            .await
                            .unwrap();
                    } else {
                        socket
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                }
            }
            requests_seen
        });

        let mut client = Http1Connection::new(&format!("http://{address}")).unwrap();
        let (status, body) = client
            .request("POST", "/v1/increments", |body| {
                body.extend_from_slice(b"{}")
            })
            .await
            .unwrap();
        assert_eq!((status, body), (202, &b"ok"[..]));
        let (status, body) = client.request("GET", "/a", |_| {}).await.unwrap();
        assert_eq!((status, body), (200, &b"hello"[..]));
        let (status, body) = client.request("GET", "/b", |_| {}).await.unwrap();
        assert_eq!((status, body), (404, &b""[..]));

        let requests = server.await.unwrap();
        assert_eq!(requests.len(), 3);
        assert!(requests[0].starts_with("POST /v1/increments HTTP/1.1\r\nhost: 127.0.0.1:"));
        assert!(
            requests[0].contains("content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        );
        assert!(requests[1].starts_with("GET /a HTTP/1.1\r\n"));
        assert!(requests[1].ends_with("content-length: 0\r\n\r\n"));
    }
}
