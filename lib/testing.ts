import net from "node:net";

/**
 * Sends `head` (a request line and headers, ending in a blank line) over a raw connection to `url` and never the body
 * it declares; resolves with the response head that comes back, or what arrived before the connection closed. What
 * answers such a request has not waited for its body.
 */
export function answerToHead(url: string, head: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    let received = "";
    socket.on("data", (d) => {
      received += d.toString();
      if (received.includes("\r\n\r\n")) {
        socket.destroy();
        resolve(received);
      }
    });
    socket.on("error", () => resolve(received));
    socket.on("close", () => resolve(received));
    socket.write(head);
  });
}
