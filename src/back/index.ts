// The initiator side of detour: sessions to the main target.
export {
  InitiatorSession,
  ScsiError,
  SessionError,
  SessionClosedError,
  ConnectionLostError,
  CommandNotRetriedError,
  CommandTimeoutError,
  CommandAbortedError,
  CommandRejectedError,
  isSafeToReissue,
  type InitiatorOptions,
  type ScsiResult,
  type CommandOptions,
  type AsyncEventMessage,
  type DiscoveredTarget,
  type SessionStats,
  type SessionErrorCode,
} from './session.ts';
export { LoginError, LoginRedirectError, randomIsid, parseTargetAddress, type ChapOptions } from './login.ts';
export { ConnectionError, parsePortal, formatPortal, type Portal } from './connection.ts';
export type { SessionParams } from 'iscsi-node-wire';
