'use strict'

// A plan on the published sdk-js (@testground/sdk): the same file runs under the original
// Testground and under ours.
//
// - `pingpong` (2 instances): both shape their egress with 25 ms of latency, instance 1
//   listens on its data address and publishes it, instance 2 connects and times a one-byte
//   round trip, which must take at least 2 x 25 ms.
// - `failure`: throws, so the run must fail.

const net = require('net')
const { invokeMap, network } = require('@testground/sdk')

const LATENCY_MS = 25
const PORT = 7100

function roundTrip (socket) {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint()
    socket.once('data', () => resolve(Number(process.hrtime.bigint() - start) / 1e6))
    socket.once('error', reject)
    socket.write('x')
  })
}

async function pingpong (runenv, client) {
  const netClient = network.newClient(client, runenv)
  await netClient.waitNetworkInitialized()
  await netClient.configureNetwork({
    network: 'default',
    enable: true,
    default: { latency: LATENCY_MS * 1e6 },
    callbackState: 'shaped',
    routingPolicy: 'deny_all'
  })
  const ip = netClient.getDataNetworkIP()
  const seq = await client.signalAndWait('roles', runenv.testInstanceCount)

  if (seq === 1) {
    const server = net.createServer((s) => s.on('data', (d) => s.write(d)))
    await new Promise((resolve) => server.listen(PORT, ip, resolve))
    await client.publish('server', { ip })
    const done = await client.barrier('measured', 1)
    await done.wait
    server.close()
    return
  }

  const sub = await client.subscribe('server')
  const { value } = await sub.wait.next()
  sub.cancel()
  const socket = net.connect(PORT, value.ip)
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve)
    socket.once('error', reject)
  })
  socket.setNoDelay(true)
  const rtt = await roundTrip(socket)
  socket.destroy()
  await client.signalEntry('measured')
  runenv.recordMessage(`rtt to ${value.ip} was ${rtt.toFixed(1)} ms`)
  if (rtt < 2 * LATENCY_MS) {
    throw new Error(`rtt ${rtt} ms is below 2 x ${LATENCY_MS} ms: the latency was not applied`)
  }
}

async function failure () {
  throw new Error('this test case fails on purpose')
}

invokeMap({ pingpong, failure })
