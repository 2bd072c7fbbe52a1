// A certified OpenID provider (node-oidc-provider) for the identity-provider tests.
//
// Usage: node provider.mjs PORT. Serves the issuer http://127.0.0.1:PORT with the client
// credentials grant, JWT access tokens (RFC 9068, typ at+jwt) signed RS256 / PS256 / ES256 /
// EdDSA (one resource server per algorithm), opaque access tokens, introspection and
// revocation. Besides the provider's own endpoints:
//   GET  /control/hits    requests seen per path, e.g. {"/token/introspection": 2}
//   POST /control/rotate  replace every signing key with a new one (new kids)
// Prints "ready" once it listens. Everything lives in memory.
import crypto from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
export const API = 'https://api.example.test';

const CLIENTS = [
  { client_id: 'service-a', client_secret: 'service-a-secret' },
  // The resource server: it introspects tokens, it is issued none.
  { client_id: 'resource-server', client_secret: 'resource-server-secret' },
];

const SIGNING = ['RS256', 'PS256', 'ES256', 'EdDSA'];
let generation = 0;

function signingKeys() {
  generation += 1;
  const make = (type, options, alg) => {
    const { privateKey } = crypto.generateKeyPairSync(type, options);
    return { ...privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid: `${alg}-${generation}` };
  };
  return [
    make('rsa', { modulusLength: 2048 }, 'RS256'),
    make('rsa', { modulusLength: 2048 }, 'PS256'),
    make('ec', { namedCurve: 'P-256' }, 'ES256'),
    make('ed25519', {}, 'EdDSA'),
  ];
}

function resourceServer(resource) {
  if (resource === `${API}/opaque`) {
    return { scope: 'api:read api:write', audience: resource, accessTokenFormat: 'opaque' };
  }
  const alg = SIGNING.find((name) => resource === `${API}/${name.toLowerCase()}`);
  if (alg === undefined) {
    return undefined;
  }
  return {
    scope: 'api:read api:write',
    audience: resource,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg } },
  };
}

function build(keys) {
  const provider = new Provider(issuer, {
    clients: CLIENTS.map((client) => ({
      ...client,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    })),
    jwks: { keys },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      introspection: { enabled: true, allowedPolicy: async () => true },
      revocation: { enabled: true, allowedPolicy: async () => true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => `${API}/rs256`,
        getResourceServerInfo: (ctx, resource) => {
          const info = resourceServer(resource);
          if (info === undefined) {
            throw new Provider.errors.InvalidTarget();
          }
          return info;
        },
      },
    },
    // Claims shaped as Keycloak shapes them, and a plan name of the provider's own.
    extraTokenClaims: () => ({ realm_access: { roles: ['user'] }, plan: 'gold' }),
    ttl: { ClientCredentials: 600 },
    enabledJWA: { requestObjectSigningAlgValues: SIGNING },
  });
  provider.on('server_error', (ctx, error) => console.error('server_error', error));
  return provider;
}

let handler = build(signingKeys()).callback();
const hits = {};

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/control/hits') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(hits));
    return;
  }
  if (path === '/control/rotate' && req.method === 'POST') {
    handler = build(signingKeys()).callback();
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ generation }));
    return;
  }
  hits[path] = (hits[path] ?? 0) + 1;
  handler(req, res);
});

server.listen(port, '127.0.0.1', () => console.log('ready'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
