// Shared by the VPC tests: the two-tenant fixture, loaded and validated, and edits of it.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parsePolicyText, type PolicyDocument } from '../../vmm-device/vpc/schema.ts';
import { gidFromIpv4 } from '../../vmm-device/vpc/net.ts';

export const FIXTURE_PATH = fileURLToPath(new URL('../../fixtures/vpc/two-tenants.json', import.meta.url));

/** The fixture as raw JSON (for edits that must go through validation again). */
export function fixtureJson(): Record<string, unknown> & { vpcs: any[]; vms: any[]; tenants: any[]; hosts: any[] } {
  return JSON.parse(readFileSync(FIXTURE_PATH, 'utf8'));
}

/** Validates a JSON value; throws with every error when invalid (tests build only valid ones with this). */
export function valid(json: unknown): PolicyDocument {
  const r = parsePolicyText(JSON.stringify(json));
  if (!r.ok) throw new Error(`invalid test policy: ${r.errors.join('; ')}`);
  return r.policy;
}

export const gid = gidFromIpv4;
