// kometa.mjs: the Kometa browser client as an ES module.
//   import Kometa from "https://push.example.com/kometa.mjs";
//   import { Kometa } from "./kometa.mjs";
// kometa.js (served beside this file) defines globalThis.Kometa once; this
// module re-exports it, so a page may load both and still share one client.
import "./kometa.js";

export const Kometa = globalThis.Kometa;
export const KometaError = Kometa.KometaError;
export default Kometa;
